package agent

import (
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// listings answer LOOKUPs from directory listings the agent fetched itself.
// A program that stats many names in one directory (git status, a build's
// dependency scan, `test -e` in a loop) costs one round trip per name; on
// the second LOOKUP that misses in a directory within the cache time, the
// agent reads the whole directory with READDIRPLUS instead (a few round
// trips), keeps the entries, and answers later LOOKUPs there from them:
// an entry the host listed is handed to the kernel (the host counted that
// lookup when it listed it), a name the complete listing lacks is absent.
//
// Changes made through this mount keep a listing true: a name made (or
// found taken) is asked of the host from then on, a name removed is absent.
// The host holds a reference per listed entry until the kernel takes it or
// the agent forgets it: when the listing expires (cache time after it was
// read), when its name changes, and when an entry's inode is written, its
// attributes set or a link made to it (the listing's attributes would be
// stale: the whole listing goes). Entries handed out once, and files with
// more than one link (the kernel may hold the inode under another name),
// are looked up on the host as usual. A listing is at most the cache time
// old when it answers, and hands its entries out with what is left of it,
// so nothing is cached longer than without it.
type listings struct {
	c   *fsClient
	ttl time.Duration

	mu     sync.Mutex
	dirs   map[uint64]*listing
	byNode map[uint64]uint64 // unhanded entry's node → its directory
	held   int               // unhanded entries in all listings
	misses map[uint64]dirMiss
	// changes counts added, removed and touched calls. A listing read
	// while it moved is not kept: a revalidating LOOKUP runs without the
	// directory's lock, so a change may land between the host listing the
	// directory and the listing being stored.
	changes uint64
}

type listing struct {
	at       time.Time
	complete bool
	names    map[string]listed
}

// listed is an entry; node 0 means "ask the host" (handed out already,
// more than one link, or listed without a node).
type listed struct {
	node uint64
	attr fsproto.Attr
}

type dirMiss struct {
	n     int
	first time.Time
}

// Bounds.
const (
	maxListed      = 4096 // unhanded entries in all listings
	maxListingRead = 4    // READDIRPLUS round trips per listing
	maxMissDirs    = 1024
)

func newListings(c *fsClient, ttl time.Duration) *listings {
	return &listings{c: c, ttl: ttl, dirs: map[uint64]*listing{}, byNode: map[uint64]uint64{}, misses: map[uint64]dirMiss{}}
}

// lookup answers a LOOKUP of name in dir from a listing, reading one first
// if dir has had its second miss. ok is false when the host must be asked.
func (ls *listings) lookup(dir uint64, name string, out *fuse.EntryOut) (st fuse.Status, ok bool) {
	if ls.ttl <= 0 {
		return 0, false
	}
	ls.mu.Lock()
	l := ls.validLocked(dir)
	if l == nil {
		if !ls.missLocked(dir) {
			ls.mu.Unlock()
			return 0, false
		}
		ls.mu.Unlock()
		l = ls.read(dir)
		if l == nil {
			return 0, false
		}
		ls.mu.Lock()
		if ls.dirs[dir] != l {
			ls.mu.Unlock()
			return 0, false
		}
	}
	defer ls.mu.Unlock()
	left := ls.ttl - time.Since(l.at)
	if left <= 0 {
		return 0, false
	}
	e, found := l.names[name]
	switch {
	case found && e.node != 0:
		l.names[name] = listed{}
		delete(ls.byNode, e.node)
		ls.held--
		*out = fuse.EntryOut{}
		ls.c.fillEntry(e.node, &e.attr, out)
		out.SetEntryTimeout(left)
		out.SetAttrTimeout(left)
		return fuse.OK, true
	case !found && l.complete:
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(left)
		return fuse.OK, true
	}
	return 0, false
}

// validLocked returns dir's listing if it is still young enough.
func (ls *listings) validLocked(dir uint64) *listing {
	l := ls.dirs[dir]
	if l != nil && time.Since(l.at) >= ls.ttl {
		ls.dropLocked(dir)
		return nil
	}
	return l
}

// missLocked counts a LOOKUP in dir that had no listing and reports
// whether it is the second within the cache time.
func (ls *listings) missLocked(dir uint64) bool {
	now := time.Now()
	m := ls.misses[dir]
	if m.n == 0 || now.Sub(m.first) >= ls.ttl {
		m = dirMiss{first: now}
	}
	m.n++
	if m.n >= 2 {
		delete(ls.misses, dir)
		return true
	}
	if len(ls.misses) >= maxMissDirs {
		clear(ls.misses)
	}
	ls.misses[dir] = m
	return false
}

// read lists dir with READDIRPLUS and keeps the entries.
func (ls *listings) read(dir uint64) *listing {
	ls.mu.Lock()
	changes := ls.changes
	ls.mu.Unlock()
	l := &listing{at: time.Now(), names: map[string]listed{}}
	refs := map[uint64]int{} // references the host gave us, by node
	giveBack := func() {
		for n, k := range refs {
			if k > 0 {
				ls.c.Forget(n, uint64(k))
			}
		}
	}
	off := uint64(0)
	watched := true
	for i := 0; i < maxListingRead; i++ {
		call, st := ls.c.call(&fsproto.Request{Op: fsproto.OpReaddir, Flags: fsproto.FlagPlus | fsproto.FlagWatch, Node: dir, Off: off, Size: fsproto.MaxReaddir}, nil, nil)
		if st != fuse.OK {
			giveBack()
			return nil
		}
		if call.flags&fsproto.ReplyWatched == 0 {
			// Unwatched, the listing could hide what the host creates.
			watched = false
		}
		if len(call.body) == 0 {
			l.complete = true
			break
		}
		err := fsproto.DecodeDirents(call.body, true, func(d *fsproto.Dirent) bool {
			off = d.Off
			if d.Node != 0 {
				refs[d.Node]++
			}
			if d.Name == "." || d.Name == ".." {
				return true
			}
			e := listed{node: d.Node, attr: d.Attr}
			if d.Attr.Nlink > 1 && d.Attr.Mode&syscall.S_IFMT != syscall.S_IFDIR {
				e.node = 0
			}
			l.names[d.Name] = e
			return true
		})
		if err != nil {
			giveBack()
			return nil
		}
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if !watched || ls.dirs[dir] != nil || ls.held+len(refs) > maxListed || ls.changes != changes {
		giveBack()
		return nil
	}
	for name, e := range l.names {
		if e.node == 0 {
			continue
		}
		if _, dup := ls.byNode[e.node]; dup {
			l.names[name] = listed{} // one node under two names: ask the host
			continue
		}
		ls.byNode[e.node] = dir
		ls.held++
		refs[e.node]-- // this one stays with the listing
	}
	giveBack() // everything not kept
	ls.dirs[dir] = l
	time.AfterFunc(ls.ttl, func() {
		ls.mu.Lock()
		defer ls.mu.Unlock()
		if ls.dirs[dir] == l {
			ls.dropLocked(dir)
		}
	})
	return l
}

// added records that name now exists in dir (made, or found taken, through
// this mount): the listing asks the host about it from now on.
func (ls *listings) added(dir uint64, name string) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.changes++
	if l := ls.dirs[dir]; l != nil {
		ls.releaseLocked(l.names[name])
		l.names[name] = listed{}
	}
}

// removed records that name no longer exists in dir.
func (ls *listings) removed(dir uint64, name string) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.changes++
	if l := ls.dirs[dir]; l != nil {
		ls.releaseLocked(l.names[name])
		delete(l.names, name)
	}
}

// releaseLocked gives back e's reference, if it holds one.
func (ls *listings) releaseLocked(e listed) {
	if e.node != 0 {
		delete(ls.byNode, e.node)
		ls.held--
		ls.c.Forget(e.node, 1)
	}
}

// touched drops the listing holding node's entry, if any: node's data or
// attributes changed.
func (ls *listings) touched(node uint64) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.changes++
	if dir, ok := ls.byNode[node]; ok {
		ls.dropLocked(dir)
	}
}

// drop forgets dir's listing: dir changed on the host.
func (ls *listings) drop(dir uint64) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.changes++
	ls.dropLocked(dir)
}

// dropAll forgets every listing.
func (ls *listings) dropAll() {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.changes++
	for dir := range ls.dirs {
		ls.dropLocked(dir)
	}
}

// dropLocked forgets dir's listing and gives its unhanded references back.
func (ls *listings) dropLocked(dir uint64) {
	l := ls.dirs[dir]
	if l == nil {
		return
	}
	delete(ls.dirs, dir)
	for _, e := range l.names {
		ls.releaseLocked(e)
	}
}
