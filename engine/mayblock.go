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

// maxMayBlockScan bounds the callout filters FlowMayBlock matches one by
// one; a layer with more answers as LayerMayBlock does.
const maxMayBlockScan = 256

// FlowMayBlock reports whether classifying vs at layer may call a callout
// registered with CalloutMayBlock: whether a filter calling one matches vs,
// arbitration aside (true: it may be called; false: it will not be). A
// datapath that reads packets on a dedicated thread classifies a flow for
// which it is false there, even at a layer where another flow's
// classification may block: only flows that may reach a callout program
// pay for a goroutine of their own. Without a CalloutMayBlock
// registration it costs one atomic load.
func (e *Engine) FlowMayBlock(layer LayerID, vs *Values) bool {
	if e.mayBlock.Load() == 0 || !layer.Valid() {
		return false
	}
	c := e.state.Load().compiled[layer]
	if c == nil {
		return false
	}
	if len(c.callouts) > maxMayBlockScan {
		return e.LayerMayBlock(layer)
	}
	for _, i := range c.callouts {
		cf := &c.filters[i]
		if cf.slot == nil {
			continue // its callout object is gone: classification calls nothing
		}
		if r := cf.slot.reg.Load(); r != nil && r.Flags&CalloutMayBlock != 0 && cf.match(vs) {
			return true
		}
	}
	return false
}
