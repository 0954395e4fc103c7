// Package api is fwpd's protocol: gRPC over the daemon's unix socket.
//
// fwp.pb.go and fwp_grpc.pb.go are generated from fwp.proto and committed,
// so that building and testing need no protoc. To regenerate, install
// protoc (Debian: protobuf-compiler) and the two plugins:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
//	go generate ./api
//
// The package also maps the management plane's typed errors to gRPC
// statuses and back (errors.go), and converts between the wire messages
// and package mgmt's objects (convert.go).
package api

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative fwp.proto
