package engine

import (
	"context"
	"testing"
)

// BenchmarkPendComplete: one classify that pends the operation, its
// completion from the same goroutine and the reauthorization.
func BenchmarkPendComplete(b *testing.B) {
	reg := pendingAuthorizer(b, func(req *ClassifyRequest, p *Pend) { _ = req.Engine().CompleteOperation(p, nil) })
	e, _ := rtEngine(b, Options{}, rtCallout{key: "p", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg})
	vs := tcpValues(client, server)
	meta := &Metadata{}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		v := *vs
		res, err := e.ClassifyWait(ctx, LayerALEAuthConnectV4, &v, meta, nil)
		if err != nil || !res.Permitted() {
			b.Fatal(res, err)
		}
	}
}

// BenchmarkRedirectClassify: an inline connect redirect (state query,
// classify handle, writable data, apply, record) per classify.
func BenchmarkRedirectClassify(b *testing.B) {
	for _, async := range []bool{false, true} {
		name := "inline"
		if async {
			name = "async"
		}
		b.Run(name, func(b *testing.B) {
			cr := &ConnectRedirect{Target: redirectTo(proxyA, 1), Async: async}
			e, _ := rtEngine(b, Options{}, rtCallout{key: "r", layer: redirLay, sublayer: 1, conds: []Condition{port80}, reg: cr.Registration()})
			cr.Handle = e.RedirectHandleCreate("r")
			vs := tcpValues(client, server)
			meta := &Metadata{}
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				res, err := e.ClassifyWait(ctx, redirLay, vs, meta, nil)
				if err != nil || res.Redirect.Remote() != proxyA {
					b.Fatal(res, err)
				}
			}
		})
	}
}
