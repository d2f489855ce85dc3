package image

import (
	"fmt"
	"net"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// parseRef parses a reference the way docker does ("busybox" is
// busybox:latest on the default registry). Registries on loopback addresses
// are spoken to over plain HTTP; nothing else is.
func parseRef(s string) (name.Reference, error) {
	ref, err := name.ParseReference(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %v", ErrInvalidRef, s, err)
	}
	if isLoopback(ref.Context().RegistryStr()) {
		if ref, err = name.ParseReference(s, name.Insecure); err != nil {
			return nil, fmt.Errorf("%w: %q: %v", ErrInvalidRef, s, err)
		}
	}
	return ref, nil
}

// parseTag parses a reference that must name a tag (a place to put an image).
func parseTag(s string) (name.Tag, error) {
	ref, err := parseRef(s)
	if err != nil {
		return name.Tag{}, err
	}
	tag, ok := ref.(name.Tag)
	if !ok {
		return name.Tag{}, fmt.Errorf("%w: %q names a digest; give a name:tag", ErrInvalidRef, s)
	}
	return tag, nil
}

func isLoopback(host string) bool {
	h, _, err := net.SplitHostPort(host)
	if err != nil {
		h = host
	}
	h = strings.Trim(h, "[]")
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// FamiliarRepo shortens a canonical repository the way docker shows it:
// the default registry and its "library/" namespace are dropped.
func FamiliarRepo(repo string) string {
	if rest, ok := strings.CutPrefix(repo, name.DefaultRegistry+"/"); ok {
		return strings.TrimPrefix(rest, "library/")
	}
	return repo
}

// parsePlatform parses "os/arch[/variant]"; "" is linux on this machine's
// architecture.
func parsePlatform(s, def string) (v1.Platform, error) {
	if s == "" {
		s = def
	}
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return v1.Platform{}, fmt.Errorf("invalid platform %q: want os/arch[/variant], e.g. linux/arm64", s)
	}
	p := v1.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

func platformString(p v1.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}
