//go:build race

package calloute2e

const raceOn = true
