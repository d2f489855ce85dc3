package snapshot

import (
	"context"
	"errors"
	"sort"
	"strings"

	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/state"
)

// Warm start: the first sandbox of a kind (sandbox.BootKey: kernel, agent,
// image, resources, network) boots, and a snapshot of its freshly set-up
// guest is kept as "boot-KEY"; later sandboxes of that kind restore it
// instead of booting. The restore gives each its own identity exactly as
// for any snapshot, and the boot snapshot holds nothing of the first
// sandbox's workload: it is taken before any command runs.

// Prefixes of the names of snapshots the store makes itself.
const (
	BootPrefix = "boot-"
	ForkPrefix = "fork-"
)

// MaxBootSnapshots bounds the boot snapshots kept; the oldest unused go.
const MaxBootSnapshots = 8

// Reserved reports whether name is one the store makes itself.
func Reserved(name string) bool {
	return strings.HasPrefix(name, BootPrefix) || strings.HasPrefix(name, ForkPrefix)
}

// Warm returns a new sandbox for opts, restored from the boot snapshot of
// its kind when there is one; otherwise it boots one and keeps its boot
// snapshot for the next time. release must be called when the sandbox is
// gone (it drops the reference on the boot snapshot). Options a boot
// snapshot cannot serve (shares, volumes) simply boot.
func (s *Store) Warm(ctx context.Context, opts sandbox.Options) (sb *sandbox.Sandbox, release func(), err error) {
	release = func() {}
	key, ok, err := sandbox.BootKey(ctx, opts)
	if err != nil || !ok {
		sb, err = sandbox.New(ctx, opts)
		return sb, release, err
	}
	name := BootPrefix + key
	if opts.ID == "" {
		opts.ID = sandbox.NewID()
	}
	if dir, rel, aerr := s.Acquire(name, opts.ID); aerr == nil {
		o := opts
		o.RestoreFrom = dir
		sb, err = sandbox.New(ctx, o)
		if err == nil {
			return sb, rel, nil
		}
		rel()
		if ctx.Err() != nil {
			return nil, release, err
		}
		// A boot snapshot that no longer restores (a changed host): drop
		// it, boot, and take a new one.
		s.Remove(name)
	}
	sb, err = sandbox.New(ctx, opts)
	if err != nil {
		return nil, release, err
	}
	s.Create(ctx, Options{Name: name, Source: sb.ID, Image: opts.Image, NoSync: true}, func(dir string) (*sandbox.SnapshotInfo, error) {
		return sb.Snapshot(ctx, dir)
	})
	s.pruneBoot()
	return sb, release, nil
}

// pruneBoot removes the oldest unused boot snapshots beyond MaxBootSnapshots.
func (s *Store) pruneBoot() {
	rows, err := s.db.ListSnapshots()
	if err != nil {
		return
	}
	var boot []*state.Snapshot
	for _, r := range rows {
		if strings.HasPrefix(r.Name, BootPrefix) && r.Status == state.SnapshotReady {
			boot = append(boot, r)
		}
	}
	sort.Slice(boot, func(i, j int) bool { return boot[i].Created.After(boot[j].Created) })
	for _, r := range boot[min(len(boot), MaxBootSnapshots):] {
		if err := s.Remove(r.Name); err != nil && !errors.Is(err, state.ErrSnapshotInUse) {
			continue
		}
	}
}
