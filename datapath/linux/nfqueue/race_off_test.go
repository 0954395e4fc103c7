//go:build !race

package nfqueue

const raceEnabled = false
