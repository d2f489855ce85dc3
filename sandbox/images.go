package sandbox

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"matchlock.dev/matchlock/image"
)

// PullPolicy says when StoreSource contacts a registry.
type PullPolicy string

// Pull policies, as in `run --pull`.
const (
	PullMissing PullPolicy = "missing" // pull only images not in the store
	PullAlways  PullPolicy = "always"  // pull every time (a no-op transfer when current)
	PullNever   PullPolicy = "never"   // use the store only
)

// StoreSource is the ImageSource backed by matchlock's image store: it
// resolves a reference locally, pulls it when the policy allows, and hands
// out the cached read-only ext4 root disk (converted once per image).
type StoreSource struct {
	Policy PullPolicy
	// Pull options (platform, progress) for pulls done on demand.
	PullOptions image.PullOptions

	once  sync.Once
	store *image.Store
	err   error
}

var _ ImageSource = (*StoreSource)(nil)

func (s *StoreSource) open() (*image.Store, error) {
	s.once.Do(func() { s.store, s.err = image.OpenDefault() })
	return s.store, s.err
}

// Rootfs implements ImageSource.
func (s *StoreSource) Rootfs(ctx context.Context, ref string) (string, ImageConfig, error) {
	st, err := s.open()
	if err != nil {
		return "", ImageConfig{}, err
	}
	var img *image.Image
	if s.Policy != PullAlways {
		img, err = st.Resolve(ref)
		if err != nil && !(errors.Is(err, image.ErrNotFound) && s.Policy != PullNever) {
			if errors.Is(err, image.ErrNotFound) {
				return "", ImageConfig{}, fmt.Errorf("image %s is not in the store and --pull=never: import or pull it first", ref)
			}
			return "", ImageConfig{}, err
		}
	}
	if img == nil {
		img, err = st.Pull(ctx, ref, s.PullOptions)
		if err != nil {
			if errors.Is(err, image.ErrNotFound) {
				return "", ImageConfig{}, fmt.Errorf("image %s: not found locally or in its registry: check the name, or 'matchlock image import' it", ref)
			}
			return "", ImageConfig{}, err
		}
	}
	path, err := st.Rootfs(ctx, img)
	if err != nil {
		return "", ImageConfig{}, err
	}
	st.Touch(img)
	c := img.Config
	return path, ImageConfig{Entrypoint: c.Entrypoint, Cmd: c.Cmd, Env: c.Env, WorkingDir: c.WorkingDir, User: c.User}, nil
}
