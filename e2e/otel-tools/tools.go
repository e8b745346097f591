//go:build tools

// Package tools pins the Jaeger the observability tests run (built by
// build.sh with the machine's Go, cached under ~/.cache/kloak).
package tools

import _ "github.com/jaegertracing/jaeger/cmd/jaeger"
