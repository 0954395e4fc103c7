package ebpf

import "errors"

// Errors of the kernel datapath; every error it returns wraps one of them
// (or an engine error), so callers test with errors.Is.
var (
	// ErrNotSupported: the policy has a filter the kernel cannot decide
	// alone (a Go callout, a field or match type the maps cannot hold, a
	// layer no hook classifies). The filter is named in the message.
	ErrNotSupported = errors.New("fwp/ebpf: filter not supported by the kernel datapath")
	// ErrCapacity: the policy does not fit the kernel's maps.
	ErrCapacity = errors.New("fwp/ebpf: policy exceeds the kernel datapath's capacity")
	// ErrInvalidRedirect: a built-in redirect's provider context is missing or malformed.
	ErrInvalidRedirect = errors.New("fwp/ebpf: invalid redirect configuration")
	// ErrNoRedirect: no redirect is recorded for the connection asked about.
	ErrNoRedirect = errors.New("fwp/ebpf: no redirect recorded")
	// ErrUnavailable: the machine cannot run the datapath (no root, no BPF,
	// no cgroup v2); the message says what is missing.
	ErrUnavailable = errors.New("fwp/ebpf: kernel datapath unavailable")
	// ErrClosed: the datapath was closed.
	ErrClosed = errors.New("fwp/ebpf: datapath closed")
)
