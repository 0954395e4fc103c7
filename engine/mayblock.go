package engine

// CalloutMayBlock, in a registration: the classify function may wait on
// something outside the process (a callout program answering over a
// socket). WFP's classifyFn runs at DISPATCH_LEVEL and must not wait — a
// callout that needs time pends — so embedded callouts are called inline
// by datapaths that read packets on a dedicated thread; a flow that may
// reach a blocking one is classified on a goroutine of its own, so that a
// slow or hung callout program delays no other flow.
const CalloutMayBlock CalloutFlags = 1 << 3

// LayerMayBlock reports whether classifying at layer may call a callout
// registered with CalloutMayBlock. Without such a registration it costs
// one atomic load.
func (e *Engine) LayerMayBlock(layer LayerID) bool {
	if e.mayBlock.Load() == 0 || !layer.Valid() {
		return false
	}
	c := e.state.Load().compiled[layer]
	if c == nil {
		return false
	}
	for _, s := range c.slots {
		if r := s.reg.Load(); r != nil && r.Flags&CalloutMayBlock != 0 {
			return true
		}
	}
	return false
}
