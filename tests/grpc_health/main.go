// A gRPC server with only the standard health service (grpc.health.v1.Health/Check), written
// against Go's standard library alone (HTTP/2 without TLS, Go 1.24+), so a test image needs no
// module downloads: `grpc-health PORT serving|down` answers SERVING for the service "" when
// started with "serving" and NOT_SERVING otherwise.
package main

import (
	"encoding/binary"
	"io"
	"log"
	"net/http"
	"os"
)

const (
	serving    = 1
	notServing = 2
)

// service reads field 1 (service, a string) of a HealthCheckRequest; "" when absent.
func service(msg []byte) string {
	for len(msg) > 1 {
		key, n := binary.Uvarint(msg)
		if n <= 0 {
			return ""
		}
		msg = msg[n:]
		if key&7 != 2 {
			return "" // the request has only the string field
		}
		size, m := binary.Uvarint(msg)
		if m <= 0 || uint64(len(msg)-m) < size {
			return ""
		}
		if key>>3 == 1 {
			return string(msg[m : m+int(size)])
		}
		msg = msg[m+int(size):]
	}
	return ""
}

func main() {
	if len(os.Args) != 3 {
		log.Fatal("usage: grpc-health PORT serving|down")
	}
	up := os.Args[2] == "serving"
	mux := http.NewServeMux()
	mux.HandleFunc("/grpc.health.v1.Health/Check", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || len(body) < 5 {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		status := byte(notServing)
		if up && service(body[5:]) == "" {
			status = serving
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
		w.WriteHeader(http.StatusOK)
		w.Write([]byte{0, 0, 0, 0, 2, 0x08, status}) // uncompressed, 2 bytes: field 1 varint
		w.Header().Set("Grpc-Status", "0")
		w.Header().Set("Grpc-Message", "")
	})
	srv := &http.Server{Addr: ":" + os.Args[1], Handler: mux, Protocols: new(http.Protocols)}
	srv.Protocols.SetUnencryptedHTTP2(true)
	log.Printf("grpc-health on :%s (%s)", os.Args[1], os.Args[2])
	log.Fatal(srv.ListenAndServe())
}
