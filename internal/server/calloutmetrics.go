package server

import "github.com/prometheus/client_golang/prometheus"

// Collector exports the remote callouts' counters for /metrics, by key.
func (h *Callouts) Collector() prometheus.Collector { return calloutCollector{h} }

type calloutCollector struct{ h *Callouts }

var (
	descCalls = prometheus.NewDesc("fwp_remote_callout_calls_total",
		"Classifications that called a remote callout.", []string{"key"}, nil)
	descPends = prometheus.NewDesc("fwp_remote_callout_pends_total",
		"Pends a remote callout took.", []string{"key"}, nil)
	descTimeouts = prometheus.NewDesc("fwp_remote_callout_timeouts_total",
		"Classifications whose remote callout missed its answer deadline (its filter's PERMIT_IF_CALLOUT_UNREGISTERED decided).", []string{"key"}, nil)
	descErrors = prometheus.NewDesc("fwp_remote_callout_errors_total",
		"Remote callout failures: malformed frames, answers that could not be applied, connections lost with work in flight.", []string{"key"}, nil)
	descHeld = prometheus.NewDesc("fwp_remote_callout_pends_held",
		"Pends a remote callout holds now.", []string{"key"}, nil)
	descRegistered = prometheus.NewDesc("fwp_remote_callout_registered",
		"1 while a callout program is registered for the key.", []string{"key"}, nil)
	descLatency = prometheus.NewDesc("fwp_remote_callout_answer_latency_microseconds",
		"Answer latency quantiles (upper bound of a power-of-two bucket).", []string{"key", "quantile"}, nil)
)

func (c calloutCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCalls, descPends, descTimeouts, descErrors, descHeld, descRegistered, descLatency} {
		ch <- d
	}
}

func (c calloutCollector) Collect(ch chan<- prometheus.Metric) {
	for _, i := range c.h.List() {
		ch <- prometheus.MustNewConstMetric(descCalls, prometheus.CounterValue, float64(i.Calls), i.Key)
		ch <- prometheus.MustNewConstMetric(descPends, prometheus.CounterValue, float64(i.Pends), i.Key)
		ch <- prometheus.MustNewConstMetric(descTimeouts, prometheus.CounterValue, float64(i.Timeouts), i.Key)
		ch <- prometheus.MustNewConstMetric(descErrors, prometheus.CounterValue, float64(i.Errors), i.Key)
		ch <- prometheus.MustNewConstMetric(descHeld, prometheus.GaugeValue, float64(i.Held), i.Key)
		reg := 0.0
		if i.Registered {
			reg = 1
		}
		ch <- prometheus.MustNewConstMetric(descRegistered, prometheus.GaugeValue, reg, i.Key)
		for q, v := range map[string]uint64{"0.5": i.P50US, "0.9": i.P90US, "0.99": i.P99US} {
			ch <- prometheus.MustNewConstMetric(descLatency, prometheus.GaugeValue, float64(v), i.Key, q)
		}
	}
}
