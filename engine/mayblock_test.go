package engine

import "testing"

func TestLayerMayBlock(t *testing.T) {
	permit := func(*ClassifyRequest, *ClassifyOut) {}
	e, _ := rtEngine(t, Options{},
		rtCallout{key: "remote", layer: LayerALEAuthConnectV4, reg: CalloutRegistration{Classify: permit}},
		rtCallout{key: "embedded", layer: LayerALEAuthRecvAcceptV4, reg: CalloutRegistration{Classify: permit}},
	)
	if e.LayerMayBlock(LayerALEAuthConnectV4) {
		t.Fatal("no CalloutMayBlock registration: may block")
	}
	if err := e.UnregisterCallout("remote"); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCallout("remote", CalloutRegistration{Classify: permit, Flags: CalloutMayBlock}); err != nil {
		t.Fatal(err)
	}
	if !e.LayerMayBlock(LayerALEAuthConnectV4) {
		t.Error("a layer calling a CalloutMayBlock registration: not reported")
	}
	if e.LayerMayBlock(LayerALEAuthRecvAcceptV4) || e.LayerMayBlock(LayerALEAuthConnectV6) {
		t.Error("layers calling only embedded callouts, or none: reported")
	}
	if err := e.UnregisterCallout("remote"); err != nil {
		t.Fatal(err)
	}
	if e.LayerMayBlock(LayerALEAuthConnectV4) || e.mayBlock.Load() != 0 {
		t.Errorf("unregistered: still reported (count %d)", e.mayBlock.Load())
	}
	if err := e.RegisterCallout("remote", CalloutRegistration{Classify: permit}); err != nil {
		t.Fatal(err)
	}
	if e.LayerMayBlock(LayerALEAuthConnectV4) {
		t.Error("registered again without the flag: reported")
	}
}
