//go:build tools

// Pins CoreDNS, the cluster DNS of the test cluster; never compiled into
// anything.
package tools

import (
	_ "github.com/coredns/coredns"
)
