// Package nfqpeer is the NFQUEUE peer fwp's kernel callout path is
// measured against: the idiomatic verdict loop of Go tools that decide
// each new connection in user space (OpenSnitch-like), built on
// florianl/go-nfqueue/v2 as its documentation shows — one queue, one
// registered hook, a verdict per packet from the hook. It accepts every
// packet: what it costs is the floor of any NFQUEUE decision in Go on the
// machine, which fwp's own path is compared with (BenchmarkNewFlowLatency's
// peer arms). cmd/nfqpeer runs it as a process of its own, as a peer runs.
package nfqpeer
