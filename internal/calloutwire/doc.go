// Package calloutwire is the wire protocol between fwpd and callout
// programs (client.RegisterCallout): length-prefixed binary frames on
// fwpd's callout socket (client.CalloutSocket).
//
// A frame is a 4-byte big-endian length, a type byte and a body of
// uvarints, length-prefixed strings and fixed-size addresses. It was chosen
// over gRPC on fwpd's API by measurement (docs/benchmarks.md, "Remote
// callouts"): a round trip to fwpd took 82–89 µs (p50) in frames against
// 187–199 µs for a gRPC call, on the 2-vCPU machine of the project, and a
// remote callout's call is one such round trip on every classification.
//
// Every decoder error wraps ErrMalformed; fwpd closes a connection that
// sends one and goes on serving the others.
package calloutwire
