// Command askuser is the Portmaster / OpenSnitch pattern as a remote
// callout: a program of its own registers a callout with fwpd at
// ALE_AUTH_CONNECT (v4 and v6), and for each new (application, remote
// address, port) pair it pends the connection, asks a person on the
// terminal, remembers the answer as a permit or block filter it adds
// through fwpd's API (so the next connection of the pair is decided by the
// filter, without a prompt), and completes the operation; the
// reauthorization that follows applies the answer.
//
//	go run ./examples/askuser                 # prompts on the terminal
//	go run ./examples/askuser -auto allow     # answers allow (tests)
//
// It adds its callout objects and catch-all filters in a dynamic session,
// so they go when it exits; the remembered filters are persistent unless
// -remember=static or dynamic. The catch-all filters carry
// PERMIT_IF_CALLOUT_UNREGISTERED unless -fail-closed: if askuser dies, its
// held connections are let through (or blocked) at once.
//
// Which connections reach it: every TCP classification fwpd's engine makes
// at ALE_AUTH_CONNECT — those of clients that classify through fwpd
// (client.Classifier), and with fwpd --datapath kernel the connects of the
// hooked cgroup, which the kernel callout path (package nfqueue) holds
// while askuser asks (its catch-all filters match TCP only: the kernel
// datapath holds only TCP flows for a Go callout).
package main
