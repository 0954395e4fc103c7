// Package engine is fwp's filter engine: the Windows Filtering Platform's
// layers, sublayers, weighted filters, typed conditions, callouts and filter
// arbitration, in pure Go.
//
// Every datapath (in-process, eBPF, NFQUEUE) asks the engine the same
// question — what does WFP decide for this connection at this ALE layer — by
// calling [Engine.Classify]. The engine answers from an immutable compiled
// index that is rebuilt on change and swapped atomically, so classification
// never takes a lock and never allocates on the plain filter path.
//
// The package imports only the standard library (a test enforces it), so it
// can be embedded anywhere.
//
//	               Classify(layer, values, metadata)
//	                            │
//	          ┌─────────────────▼──────────────────┐
//	          │ snapshot (atomic.Pointer)           │
//	          │  layer ─► index: proto/port/addr/app│
//	          │        ─► candidates in rank order  │
//	          └─────────────────┬──────────────────┘
//	sublayer 1 (highest weight) │ first matching filter that returns
//	sublayer 2                  │ permit/block decides the sublayer;
//	...                         ▼ sublayers combine by the ACTION_WRITE right
//	                   Result{ClassifyOut, Filter, Reason}
//
// Arbitration follows WFP's "Filter Arbitration" page and fwp's design
// document; the readings fwp takes where WFP is silent are documented on
// the arbiter in classify.go and in docs/semantics.md.
package engine
