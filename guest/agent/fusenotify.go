package agent

import (
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Host changes (fsproto.ReplyNotify): the host watches the directories the
// agent answers lookups in by itself (fresh directories, listings) and
// says when a name there changes on the host. The agent then forgets what
// it knew of the directory and tells the kernel to drop its entry for the
// name (a cached "absent" most of all), so that a file the host just made
// is found at once rather than after the cache time.

// maxPendingInval bounds kernel invalidations waiting to be sent; beyond
// it they are dropped, and the kernel's entries expire with the cache time
// as they would without notifications.
const maxPendingInval = 1024

type inval struct {
	dir  uint64
	name string
}

// hostChanged handles a notification: name changed in dir on the host
// (dir 0: anything may have).
func (c *fsClient) hostChanged(dir uint64, name string) {
	if dir == 0 {
		c.fresh.dropAll()
		c.lists.dropAll()
		return
	}
	c.fresh.drop(dir)
	c.lists.drop(dir)
	if name == "" {
		return
	}
	select {
	case c.invals <- inval{dir, name}:
	default:
	}
}

// sendInvals tells the kernel about changed entries. It runs apart from
// the reply readers: the kernel takes the directory's lock for an
// invalidation, and a request holding that lock may be waiting for a
// reply they must deliver.
func (c *fsClient) sendInvals(srv *fuse.Server) {
	for {
		select {
		case iv := <-c.invals:
			srv.EntryNotify(iv.dir, iv.name)
		case <-c.st.Done():
			return
		}
	}
}
