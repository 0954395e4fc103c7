//go:build linux

// Command nfqpeer is nfqpeer's verdict loop as a process of its own, as an
// NFQUEUE peer runs: it binds -queue in its network namespace (run it
// with nsenter for another), prints "ready", accepts every packet until
// its standard input closes, and prints how many it accepted.
package main
