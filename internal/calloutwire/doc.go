// Package calloutwire is the wire protocol between fwpd and callout
// programs (client.RegisterCallout): length-prefixed binary frames on
// fwpd's callout socket (client.CalloutSocket).
//
// A frame is a 4-byte big-endian length, a type byte and a body of
// uvarints, length-prefixed strings and fixed-size addresses. It was chosen
// over a gRPC bidirectional stream by measurement (docs/benchmarks.md,
// "Remote callouts"): the added latency of a remote callout call is two
// frames and two process wake-ups, and gRPC's HTTP/2 framing and per-message
// goroutine hand-offs more than doubled it on a 2-vCPU machine.
//
// Every decoder error wraps ErrMalformed; fwpd closes a connection that
// sends one and goes on serving the others.
package calloutwire
