package engine

import "context"

// FinishPended waits for the pend a classification returned (res.Pend) and
// finishes it as ClassifyWait does (reauthorization, resumed classify,
// deadline default). A datapath that classifies inline, where nothing may
// wait, hands a pended result to a goroutine of its own and finishes it
// there, so one pended flow holds up no other. A result without a pend is
// returned as it is. vs and meta must be those of the classification.
func (e *Engine) FinishPended(ctx context.Context, res Result, vs *Values, meta *Metadata) (Result, error) {
	for res.Pend != nil {
		p := res.Pend
		res = e.finishPend(p, p.Wait(ctx), vs, meta)
		if err := ctx.Err(); err != nil {
			if res.Pend != nil {
				res.Pend.Cancel()
				res.Pend = nil
			}
			return res, err
		}
	}
	return res, nil
}
