// Package etcdtest runs a real etcd cluster for tests: members are
// subprocesses of the etcd binary (Debian's etcd-server package) on
// loopback ports chosen free, each with its own data directory, so a test
// can kill, stop and restart members. A subprocess rather than the
// embeddable server module: embedding etcd would add the server's whole
// dependency tree (raft, bbolt, its gRPC gateway) to fwp's module for tests
// only, and a member killed in-process cannot be killed for real.
package etcdtest
