package mgmt

import (
	"context"
	"fmt"
	"testing"
	"time"

	"fwp/engine"
)

// BenchmarkPersistentSmallCommit: one persistent filter added (then
// deleted) per commit, with n persistent filters already stored.
func BenchmarkPersistentSmallCommit(b *testing.B) {
	for _, n := range []int{1_000, 100_000} {
		b.Run(fmt.Sprintf("stored=%d", n), func(b *testing.B) {
			m, err := New(engine.New(engine.Options{}), Options{StateDir: b.TempDir(), TxnTimeout: time.Minute})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			ctx := context.Background()
			s := open(m, "bench", false)
			if err := m.Begin(ctx, s); err != nil {
				b.Fatal(err)
			}
			for i := range n {
				if _, err := m.Add(ctx, s, blockPort(fmt.Sprintf("f%d", i), 1+i%60000, LifetimePersistent)); err != nil {
					b.Fatal(err)
				}
			}
			if err := m.Commit(s); err != nil {
				b.Fatal(err)
			}
			i := 0
			for b.Loop() {
				key := fmt.Sprintf("small%d", i)
				i++
				if err := m.Begin(ctx, s); err != nil {
					b.Fatal(err)
				}
				if _, err := m.Add(ctx, s, blockPort(key, 7, LifetimePersistent)); err != nil {
					b.Fatal(err)
				}
				if err := m.Commit(s); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
