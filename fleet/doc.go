// Package fleet makes fwpd follow a policy kept in etcd, as WFP's hosts
// follow Group Policy: one versioned policy for many hosts, each host's
// status visible to all.
//
// The policy is a set of documents under <prefix>policies/<name>, each in
// the format fwpctl apply takes (package policy), with an optional nodes
// section selecting the hosts it applies to. A host's fleet policy at a
// revision is the union of the documents that select it.
//
// A Follower watches the prefix and applies every revision that changes it
// as one mgmt transaction, in revision order: the difference between the
// objects in force and the objects wanted (deletions first, then
// additions; an object that changes is replaced with everything that
// refers to it). All or nothing: a document that does not parse, or a
// policy that mgmt or the datapath refuses, leaves the previous policy in
// force, and the error is reported.
//
// Fleet objects are persistent and belong to the provider fwp.fleet unless
// their document names another; local objects (added with fwpctl) are
// never touched: the follower changes only the objects it recorded as its
// own. That record — the applied revision, the policy's hash and the
// objects with their digests — is the provider context fwp.fleet.state,
// written in the same transaction as the policy it describes, so a host
// that restarts resumes from exactly the revision it enforces.
//
// While etcd is unreachable the host keeps enforcing what it has and says
// so (Status.Connected); on reconnect it reads the documents at its
// applied revision and watches from the next one, or, when etcd has
// compacted that revision away, lists the documents and applies them.
//
// Each host reports its Status under <prefix>nodes/<name>, attached to a
// lease, so a host that dies vanishes from the list when the lease ends.
//
// Writers (fwpctl fleet apply) use PutDocument, which parses and checks
// a document as the followers will, dry-runs the resulting policy of
// every known host on an in-memory manager, and writes it in one etcd
// transaction conditional on no document having changed meanwhile.
package fleet
