package policy

import (
	"bytes"
	"fmt"
	"testing"
)

// BenchmarkParseValuesFile: a policy whose one filter lists a million v4
// addresses from a values file (one per line), parsed into an engine.List.
func BenchmarkParseValuesFile(b *testing.B) {
	var file bytes.Buffer
	for i := range 1_000_000 {
		v := uint32(127<<24|1<<16) + 2*uint32(i)
		fmt.Fprintf(&file, "%d.%d.%d.%d\n", byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	pol := []byte("filters:\n  - {key: bl, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_address, values_file: l.txt}]}\n")
	opts := Options{ValuesFiles: map[string][]byte{"l.txt": file.Bytes()}}
	b.SetBytes(int64(file.Len()))
	for b.Loop() {
		p, err := ParseWith("p.yaml", pol, opts)
		if err != nil || p.Ops[0].Add.Filter.Conditions[0].List.Len() != 1_000_000 {
			b.Fatal(err)
		}
	}
}
