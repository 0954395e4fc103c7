package main

import (
	"fmt"
	"strconv"

	"fwp/mgmt"
)

// contextData shows a provider context's data, or, to a reader, whom fwpd
// does not show it, its length and SHA-256.
func contextData(c *mgmt.ProviderContext) string {
	if c.DataRedacted {
		return fmt.Sprintf("(withheld: %d bytes, sha256 %s)", c.DataLength, c.DataSHA256)
	}
	return dash(strconv.Quote(string(c.Data)))
}
