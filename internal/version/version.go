// Package version holds the build's version, set with -ldflags.
package version

// Version is stamped by the Makefile; "dev" otherwise.
var Version = "dev"

// Protocol is the host↔guest and RPC protocol generation.
const Protocol = 1
