package agent

import (
	"sync"
	"time"
)

// freshDirs lets a share answer LOOKUPs of absent names in directories it
// made itself, without a round trip. A directory this mount created was
// empty then, and while it is fresh (for the mount's cache time after its
// creation) the guest knows every name put into it through this mount; any
// other name is absent as far as the guest may know: a name created in it
// on the host shows up once the directory stops being fresh, as late as a
// name the kernel cached as absent. The pattern this serves is a tool
// creating a directory and filling it at once (git checkout, npm install,
// tar): there each create costs a LOOKUP less.
//
// Anything this does not follow exactly (a rename with flags, a create
// that finds the name taken on the host, too many names) makes the
// directory unfresh, which only costs the round trips again.
type freshDirs struct {
	ttl time.Duration

	mu   sync.Mutex
	dirs map[uint64]*freshDir
}

type freshDir struct {
	until time.Time
	names map[string]struct{}
}

// Bounds on what freshDirs keeps.
const (
	maxFreshDirs  = 512
	maxFreshNames = 4096
)

func newFreshDirs(ttl time.Duration) *freshDirs {
	return &freshDirs{ttl: ttl, dirs: map[uint64]*freshDir{}}
}

// made records that this mount just created directory node.
func (f *freshDirs) made(node uint64) {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.dirs) >= maxFreshDirs {
		for id, d := range f.dirs {
			if now.After(d.until) {
				delete(f.dirs, id)
			}
		}
		if len(f.dirs) >= maxFreshDirs {
			return
		}
	}
	f.dirs[node] = &freshDir{until: now.Add(f.ttl), names: map[string]struct{}{}}
}

// absent reports whether name is known absent from dir, and for how much
// longer that holds.
func (f *freshDirs) absent(dir uint64, name string) (time.Duration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.dirs[dir]
	if !ok {
		return 0, false
	}
	left := time.Until(d.until)
	if left <= 0 {
		delete(f.dirs, dir)
		return 0, false
	}
	if _, taken := d.names[name]; taken {
		return 0, false
	}
	return left, true
}

// add records that name now exists in dir.
func (f *freshDirs) add(dir uint64, name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d, ok := f.dirs[dir]; ok {
		if len(d.names) >= maxFreshNames {
			delete(f.dirs, dir)
			return
		}
		d.names[name] = struct{}{}
	}
}

// remove records that name no longer exists in dir.
func (f *freshDirs) remove(dir uint64, name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d, ok := f.dirs[dir]; ok {
		delete(d.names, name)
	}
}

// drop forgets dir: its LOOKUPs go to the host again.
func (f *freshDirs) drop(dir uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.dirs, dir)
}

// dropAll forgets every fresh directory.
func (f *freshDirs) dropAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.dirs)
}
