package workspace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// A watcher tells the guest about names that change in a directory on the
// host, so that the guest may answer lookups in it by itself (fresh
// directories, listings: guest/agent) and the guest kernel may cache
// absent names without missing files the host creates. It watches the
// directories the guest asks for (a READDIRPLUS with fsproto.FlagWatch)
// and those the guest creates, with inotify, and sends a
// fsproto.ReplyNotify record per name created, removed or moved there by
// anyone but this server. Changes this server made itself are recognised
// by (directory, name) for a short while and not reported.
//
// Contents and attributes are not watched: for those the guest's cache
// time holds as before.
type watcher struct {
	f *os.File // inotify, non-blocking (Close ends the reader)

	mu     sync.Mutex
	byNode map[uint64]int32
	byWd   map[int32]uint64
	own    map[ownChange]time.Time
}

type ownChange struct {
	dir  uint64
	name string
}

const (
	// maxWatches bounds the directories one server watches; beyond it
	// the guest is told a directory is not watched.
	maxWatches = 4096
	// ownWindow is how long a change this server made hides the inotify
	// events of the same name in the same directory.
	ownWindow = 2 * time.Second
	maxOwn    = 8192

	watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
		unix.IN_DELETE_SELF | unix.IN_ONLYDIR
)

// newWatcher returns nil if inotify is unavailable (nothing is then watched).
func newWatcher() *watcher {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil
	}
	return &watcher{f: os.NewFile(uintptr(fd), "inotify"), byNode: map[uint64]int32{},
		byWd: map[int32]uint64{}, own: map[ownChange]time.Time{}}
}

// watch starts watching directory node id (descriptor fd) and reports
// whether it is watched.
func (w *watcher) watch(id uint64, fd int) bool {
	if w == nil {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.byNode[id]; ok {
		return true
	}
	if len(w.byNode) >= maxWatches {
		return false
	}
	var wd int
	err := errClosed
	w.control(func(ifd int) {
		// The node's O_PATH descriptor, through /proc: inotify takes a path.
		wd, err = unix.InotifyAddWatch(ifd, fmt.Sprintf("/proc/self/fd/%d", fd), watchMask)
	})
	if err != nil {
		return false
	}
	w.byNode[id], w.byWd[int32(wd)] = int32(wd), id
	return true
}

// unwatch stops watching node id (forgotten by the guest).
func (w *watcher) unwatch(id uint64) {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	wd, ok := w.byNode[id]
	if !ok {
		return
	}
	delete(w.byNode, id)
	delete(w.byWd, wd)
	w.control(func(ifd int) { unix.InotifyRmWatch(ifd, uint32(wd)) })
}

var errClosed = errors.New("inotify closed")

// control runs f on the inotify descriptor, unless the watcher is closed.
func (w *watcher) control(f func(fd int)) {
	if rc, err := w.f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { f(int(fd)) })
	}
}

// ownChange records that this server is about to change name in dir.
func (w *watcher) ownChange(dir uint64, name string) {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, watched := w.byNode[dir]; !watched {
		return
	}
	now := time.Now()
	if len(w.own) >= maxOwn {
		for k, t := range w.own {
			if now.Sub(t) > ownWindow {
				delete(w.own, k)
			}
		}
		if len(w.own) >= maxOwn {
			clear(w.own) // at worst the guest drops some state it could keep
		}
	}
	w.own[ownChange{dir, name}] = now
}

// run reads events until the watcher is closed and calls notify for each
// change the guest must hear of (dir 0: anything may have changed).
func (w *watcher) run(notify func(dir uint64, name string)) {
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				notify(0, "") // events may be lost from here on
			}
			return
		}
		for b := buf[:n]; len(b) >= unix.SizeofInotifyEvent; {
			wd := int32(binary.NativeEndian.Uint32(b[0:]))
			mask := binary.NativeEndian.Uint32(b[4:])
			l := int(binary.NativeEndian.Uint32(b[12:]))
			if unix.SizeofInotifyEvent+l > len(b) {
				break
			}
			name := string(b[unix.SizeofInotifyEvent : unix.SizeofInotifyEvent+l])
			for len(name) > 0 && name[len(name)-1] == 0 {
				name = name[:len(name)-1]
			}
			b = b[unix.SizeofInotifyEvent+l:]
			if dir, tell := w.event(wd, mask, name); tell {
				notify(dir, name)
			}
		}
	}
}

// event interprets one inotify event.
func (w *watcher) event(wd int32, mask uint32, name string) (uint64, bool) {
	if mask&unix.IN_Q_OVERFLOW != 0 {
		return 0, true
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	dir, ok := w.byWd[wd]
	if !ok {
		return 0, false
	}
	if mask&unix.IN_IGNORED != 0 { // the directory went away, or unwatch
		delete(w.byWd, wd)
		delete(w.byNode, dir)
		return dir, true
	}
	if mask&unix.IN_DELETE_SELF != 0 {
		return dir, true
	}
	if t, own := w.own[ownChange{dir, name}]; own && time.Since(t) < ownWindow {
		return 0, false
	}
	return dir, true
}

func (w *watcher) close() {
	if w != nil {
		w.f.Close()
	}
}

// notifyRecord is a ReplyNotify record for a change of name in dir.
func notifyRecord(dir uint64, name string) []byte {
	b := fsproto.AppendReplyHead(nil, 0, 0, fsproto.ReplyNotify, 8+len(name))
	b = fsproto.AppendUint64(b, dir)
	return append(b, name...)
}
