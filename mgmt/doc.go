// Package mgmt is fwp's management plane, WFP's base filtering engine
// (BFE) over one engine.Engine: sessions, transactions, object lifetimes,
// persistence, enumeration, change subscriptions and net events.
//
// Objects are named by key. The manager records for each object its
// owning session and its lifetime:
//
//   - dynamic: deleted when its session closes (or its client dies);
//   - static: lives until the daemon exits;
//   - persistent: stored on disk and restored at start;
//   - boot-time: stored separately, applied at start before anything
//     else, and replaced by the persistent policy once that is loaded, as
//     WFP's boot-time filters give way when BFE starts.
//
// An object may not reference one that lives shorter (ErrLifetime). A
// commit is one atomic engine swap preceded by one crash-safe store write
// (an fsynced append to a journal beside a snapshot, which is rewritten
// only when the journal outgrows it), so a daemon killed at any point comes
// back with the state before or after a commit, never between.
package mgmt
