// Package metrics exports fwpd's Prometheus metrics: classifications by
// layer and action, pends outstanding, filters per layer, commit latency.
package metrics
