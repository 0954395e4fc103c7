package engine_test

import (
	"fmt"
	"net/netip"

	"fwp/engine"
)

// A firewall provider blocks a subnet in its own sublayer; an admin's hard
// permit in a higher sublayer still lets one host through.
func ExampleEngine_Classify() {
	e := engine.New(engine.Options{})
	_ = e.Update(func(tx *engine.Txn) error {
		fw, _ := tx.AddSublayer(engine.Sublayer{Key: "firewall", Weight: 100})
		admin, _ := tx.AddSublayer(engine.Sublayer{Key: "admin", Weight: 200})
		_, err := tx.AddFilter(engine.Filter{
			Layer: engine.LayerALEAuthConnectV4, Sublayer: fw,
			Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual,
				Value: engine.Prefix(netip.MustParsePrefix("192.0.2.0/24"))}},
			Action: engine.Action{Type: engine.ActionBlock},
		})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{
			Layer: engine.LayerALEAuthConnectV4, Sublayer: admin, Flags: engine.FilterClearActionRight,
			Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual,
				Value: engine.Addr(netip.MustParseAddr("192.0.2.7"))}},
			Action: engine.Action{Type: engine.ActionPermit},
		})
		return err
	})
	for _, dst := range []string{"192.0.2.7:443", "192.0.2.8:443", "198.51.100.1:443"} {
		var vs engine.Values
		vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort(dst))
		res := e.Classify(engine.LayerALEAuthConnectV4, &vs, nil)
		fmt.Println(dst, res)
	}
	// Output:
	// 192.0.2.7:443 permit (hard) by filter#2 in sublayer#3: permit filter
	// 192.0.2.8:443 block (hard) by filter#1 in sublayer#2: block filter
	// 198.51.100.1:443 permit: no filter matched; the layer permits
}
