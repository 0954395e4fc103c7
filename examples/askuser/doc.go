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
// held connections are let through at once. Under -fail-closed the
// callouts and catch-all filters get -remember's lifetime instead (the next
// run reuses them): while askuser is not running every new TCP connection
// they match is refused at once, held ones too, until it registers again.
// To leave that mode, delete them:
//
//	fwpctl filter delete askuser-catchall-ALE_AUTH_CONNECT_V4 askuser-catchall-ALE_AUTH_CONNECT_V6
//	fwpctl callout delete askuser-ALE_AUTH_CONNECT_V4 askuser-ALE_AUTH_CONNECT_V6
//
// Which connections reach it: every TCP classification fwpd's engine makes
// at ALE_AUTH_CONNECT — those of clients that classify through fwpd
// (client.Classifier), and with fwpd --datapath kernel the connects of the
// hooked cgroup, which the kernel callout path (package nfqueue) holds
// while askuser asks (its catch-all filters match TCP only: the kernel
// datapath holds only TCP flows for a Go callout).
package main
