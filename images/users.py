"""The image config's User ("", "name", "uid", "name:group", "uid:gid") resolved against the image's
own /etc/passwd and /etc/group, as container runtimes do before starting the process."""

from __future__ import annotations

from pathlib import Path

from images.unpack import resolve_in_root


class UnknownUserError(ValueError):
    """The user or group is named but not in the image's passwd or group file."""


def _entries(rootfs: Path, name: str) -> list[list[str]]:
    path = Path(resolve_in_root(str(rootfs), name))
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(rootfs: Path, user: str | None) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids) for `user` inside rootfs. Blocking: run it in a thread."""
    spec_user, _, spec_group = (user or "").partition(":")
    passwd = [e for e in _entries(rootfs, "/etc/passwd") if len(e) >= 4]
    groups = [e for e in _entries(rootfs, "/etc/group") if len(e) >= 3]

    uid, gid, name = 0, 0, "root"
    if spec_user:
        match = next((e for e in passwd if e[0] == spec_user), None)
        if match is None and spec_user.isdigit():
            match = next((e for e in passwd if e[2] == spec_user), None)
            uid, name = int(spec_user), match[0] if match else ""
            gid = int(match[3]) if match and match[3].isdigit() else 0
        elif match is None:
            raise UnknownUserError(f"unable to find user {spec_user}: no matching entries in passwd file")
        else:
            uid, gid, name = int(match[2]), int(match[3]), match[0]
    else:
        root = next((e for e in passwd if e[2] == "0"), None)
        gid = int(root[3]) if root and root[3].isdigit() else 0

    if spec_group:
        group = next((e for e in groups if e[0] == spec_group), None)
        if group is not None:
            gid = int(group[2])
        elif spec_group.isdigit():
            gid = int(spec_group)
        else:
            raise UnknownUserError(f"unable to find group {spec_group}: no matching entries in group file")
        return uid, gid, []  # an explicit group replaces the supplementary groups, as runc does
    extra = sorted({int(e[2]) for e in groups if name and name in e[3].split(",") and e[2].isdigit()} - {gid})
    return uid, gid, extra
