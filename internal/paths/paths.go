// Package paths names matchlock's directories on the host.
//
//	cache: $MATCHLOCK_CACHE, else $XDG_CACHE_HOME/matchlock, else ~/.cache/matchlock
//	       kernel/, images/, initramfs/, accel verdicts — rebuildable artefacts
//	state: $MATCHLOCK_HOME, else ~/.matchlock
//	       sandboxes/<id>/ — per-sandbox writable layers, logs, sockets
package paths

import (
	"os"
	"path/filepath"
)

// CacheDir returns the cache base directory.
func CacheDir() string {
	if d := os.Getenv("MATCHLOCK_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "matchlock")
	}
	return filepath.Join(home(), ".cache", "matchlock")
}

// StateDir returns the state base directory.
func StateDir() string {
	if d := os.Getenv("MATCHLOCK_HOME"); d != "" {
		return d
	}
	return filepath.Join(home(), ".matchlock")
}

func home() string {
	if h, err := os.UserHomeDir(); err == nil {
		return h
	}
	return "/tmp"
}
