//go:build tools

// Pins helm for the cluster tests; never compiled into anything.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
