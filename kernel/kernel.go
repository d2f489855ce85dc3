// Package kernel locates the guest kernel: an uncompressed PVH vmlinux
// built from the project's own config by kernel/build.sh.
package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"matchlock.dev/matchlock/internal/paths"
)

// ErrNotFound means no kernel is available.
var ErrNotFound = errors.New("guest kernel not found")

// Env is the environment variable that overrides the kernel path.
const Env = "MATCHLOCK_KERNEL"

// DefaultPath is where kernel/build.sh links the kernel it built last.
func DefaultPath() string { return filepath.Join(paths.CacheDir(), "kernel", "vmlinux") }

// Find returns the kernel to boot: explicit (a --kernel flag) if set, else
// $MATCHLOCK_KERNEL, else the last kernel built by kernel/build.sh.
func Find(explicit string) (string, error) {
	p, origin := explicit, "--kernel"
	if p == "" {
		p, origin = os.Getenv(Env), "$"+Env
	}
	if p == "" {
		p, origin = DefaultPath(), "default"
	}
	fi, err := os.Stat(p)
	if err != nil {
		if origin == "default" {
			return "", fmt.Errorf("%w at %s: build it with kernel/build.sh (or set %s)", ErrNotFound, p, Env)
		}
		return "", fmt.Errorf("%w: %s %s does not exist", ErrNotFound, origin, p)
	}
	if fi.IsDir() || fi.Size() < 1<<20 {
		return "", fmt.Errorf("%w: %s is not a vmlinux image", ErrNotFound, p)
	}
	return p, nil
}
