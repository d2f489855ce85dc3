package rootfs

import (
	"fmt"
	"path"
	"strings"
)

// Limits of a name inside the ext4 image.
const (
	maxNameLen = 255  // one path component, ext4's limit
	maxPathLen = 4096 // a whole path, Linux PATH_MAX
)

// CleanPath turns a tar entry name into a path relative to the image root:
// no leading slash, no "." or ".." components and no trailing slash; "" is the
// root itself. ".." at the root stays at the root, as the kernel treats "/..",
// so no name can point above the image: "../../etc/passwd" is "etc/passwd".
// It fails for names that ext4 cannot hold (a NUL byte, a component longer
// than 255 bytes, a path longer than 4096).
func CleanPath(name string) (string, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: entry name %q holds a NUL byte", ErrInvalid, name)
	}
	if len(name) > maxPathLen {
		return "", fmt.Errorf("%w: entry name of %d bytes is longer than %d", ErrInvalid, len(name), maxPathLen)
	}
	p := path.Clean("/" + name)[1:]
	for rest := p; rest != ""; {
		var comp string
		comp, rest, _ = strings.Cut(rest, "/")
		if len(comp) > maxNameLen {
			return "", fmt.Errorf("%w: entry name %q has a component longer than %d bytes", ErrInvalid, name, maxNameLen)
		}
	}
	return p, nil
}

// splitPath returns the components of a cleaned path; nil for the root.
func splitPath(p string) []string {
	if p == "" {
		return nil
	}
	return strings.Split(p, "/")
}
