package rootfs

import (
	"archive/tar"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
)

// OCI whiteout markers (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// maxSymlinkHops bounds symlink resolution of parent directories, as the
// kernel's ELOOP does (40 on Linux).
const maxSymlinkHops = 40

// overlayXattrPrefix names the xattrs that overlayfs interprets (opaque,
// redirect, metacopy). An image must not be able to steer the guest's overlay
// mount, so they are dropped.
const overlayXattrPrefix = "trusted.overlay."

// meta is everything an inode keeps of its tar header.
type meta struct {
	typ                 byte // tar.TypeReg, TypeDir, TypeSymlink, TypeChar, TypeBlock or TypeFifo
	mode                int64
	uid, gid            int
	size                int64 // regular files only
	linkname            string
	devmajor, devminor  int64
	mtime, atime, ctime time.Time
	xattrs              map[string]string
}

// inode is one file of the flattened tree; hard links are dentries sharing it.
type inode struct {
	meta
	// Where a regular file's content is: entry number ordinal of layer; the
	// raw header name is kept to check that the second pass reads the same
	// entry.
	layer, ordinal int
	srcName        string
	// path is the canonical name the emitted tar gives the inode: the first
	// dentry of a sorted walk. Empty until planned.
	path string
}

// dentry is a name in a directory.
type dentry struct {
	name     string
	parent   *dentry
	children map[string]*dentry // directories only
	ino      *inode
	// layer is the last layer that wrote this name or a name below it; an
	// opaque marker or a whiteout only hides names from lower layers.
	layer int
}

func (d *dentry) isDir() bool { return d.ino.typ == tar.TypeDir }

// tree is the flattened filesystem being planned. Not safe for concurrent use.
type tree struct {
	root    *dentry
	lim     Limits
	entries int   // tar entries read, all layers
	content int64 // declared regular-file bytes, all layers
	stats   Stats
}

func newTree(lim Limits) *tree {
	root := &dentry{children: map[string]*dentry{}, ino: &inode{meta: meta{typ: tar.TypeDir, mode: 0o755}}, layer: -1}
	return &tree{root: root, lim: lim}
}

func newDirEntry(parent *dentry, name string, m meta, layer int) *dentry {
	d := &dentry{name: name, parent: parent, ino: &inode{meta: m}, layer: layer}
	if m.typ == tar.TypeDir {
		d.children = map[string]*dentry{}
	}
	parent.children[name] = d
	return d
}

// resolveDir finds the directory that the components name, following
// symlinks inside the tree (".." at the root stays at the root, an absolute
// target starts at the image root), so that no name can leave the image.
// Missing directories are created, as tar extraction does, when create is
// set; nil means the path runs through a non-directory, a dangling name or a
// symlink loop. Every directory walked is stamped with layer when create is
// set: the layer then has content below it.
func (t *tree) resolveDir(comps []string, layer int, create bool) *dentry {
	cur := t.root
	hops := 0
	pending := comps
	for len(pending) > 0 {
		c := pending[0]
		pending = pending[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if cur.parent != nil {
				cur = cur.parent
			}
			continue
		}
		child := cur.children[c]
		if child == nil {
			if !create {
				return nil
			}
			child = newDirEntry(cur, c, meta{typ: tar.TypeDir, mode: 0o755}, layer)
		}
		switch child.ino.typ {
		case tar.TypeDir:
			cur = child
			if create && cur.layer < layer {
				cur.layer = layer
			}
		case tar.TypeSymlink:
			hops++
			if hops > maxSymlinkHops {
				return nil
			}
			target := child.ino.linkname
			if strings.HasPrefix(target, "/") {
				cur = t.root
			}
			next := strings.Split(target, "/")
			pending = append(next, pending...)
		default:
			return nil
		}
	}
	return cur
}

// lookup finds the dentry a cleaned path names without following its last
// component; nil if absent.
func (t *tree) lookup(p string) *dentry {
	comps := splitPath(p)
	if len(comps) == 0 {
		return t.root
	}
	dir := t.resolveDir(comps[:len(comps)-1], 0, false)
	if dir == nil {
		return nil
	}
	return dir.children[comps[len(comps)-1]]
}

// pruneLower removes every name below d written only by layers under layer:
// the effect of an opaque marker in d.
func pruneLower(d *dentry, layer int) {
	for name, c := range d.children {
		switch {
		case c.layer < layer:
			delete(d.children, name)
		case c.isDir():
			pruneLower(c, layer)
		}
	}
}

// apply adds entry ordinal of layer to the tree. It returns an error only for
// archives that cannot be represented; entries that tar extraction would
// refuse (a name below a regular file, a hard link to nothing) are skipped
// and counted.
func (t *tree) apply(hdr *tar.Header, layer, ordinal int) error {
	p, err := CleanPath(hdr.Name)
	if err != nil {
		return err
	}
	comps := splitPath(p)
	if len(comps) == 0 { // the root itself
		if hdr.Typeflag == tar.TypeDir {
			m, err := headerMeta(hdr)
			if err != nil {
				return err
			}
			t.root.ino.meta = m
		} else {
			t.stats.Skipped++
		}
		return nil
	}
	dirComps, base := comps[:len(comps)-1], comps[len(comps)-1]

	if strings.HasPrefix(base, whiteoutPrefix) {
		dir := t.resolveDir(dirComps, layer, false)
		if dir == nil {
			return nil // nothing to hide
		}
		t.stats.Whiteouts++
		if base == opaqueMarker {
			pruneLower(dir, layer)
			return nil
		}
		if victim := dir.children[base[len(whiteoutPrefix):]]; victim != nil && victim.layer < layer {
			delete(dir.children, victim.name)
		}
		return nil
	}

	switch hdr.Typeflag {
	case tar.TypeLink:
		target, err := CleanPath(hdr.Linkname)
		if err != nil {
			return err
		}
		src := t.lookup(target)
		if src == nil || src.isDir() {
			t.stats.Skipped++
			return nil
		}
		dir := t.resolveDir(dirComps, layer, true)
		if dir == nil {
			t.stats.Skipped++
			return nil
		}
		if old := dir.children[base]; old != nil && old.ino == src.ino {
			return nil
		}
		d := &dentry{name: base, parent: dir, ino: src.ino, layer: layer}
		dir.children[base] = d
		return nil
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont, tar.TypeDir, tar.TypeSymlink,
		tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default: // global headers, volume labels, sockets: nothing to put in a filesystem
		t.stats.Skipped++
		return nil
	}

	m, err := headerMeta(hdr)
	if err != nil {
		return err
	}
	if m.typ == tar.TypeReg {
		if hdr.Size > t.lim.MaxBytes-t.content {
			return fmt.Errorf("%w: file contents exceed %d bytes", ErrTooLarge, t.lim.MaxBytes)
		}
		t.content += hdr.Size
	}
	dir := t.resolveDir(dirComps, layer, true)
	if dir == nil {
		t.stats.Skipped++
		return nil
	}
	old := dir.children[base]
	if old != nil && old.isDir() && m.typ == tar.TypeDir {
		// A directory over a directory keeps what is in it.
		old.ino.meta = m
		old.layer = layer
		return nil
	}
	d := newDirEntry(dir, base, m, layer)
	if m.typ == tar.TypeReg && m.size > 0 {
		d.ino.layer, d.ino.ordinal, d.ino.srcName = layer, ordinal, hdr.Name
	}
	return nil
}

// headerMeta converts a tar header to inode metadata, refusing values that
// ext4 cannot hold.
func headerMeta(hdr *tar.Header) (meta, error) {
	m := meta{
		typ:      hdr.Typeflag,
		mode:     hdr.Mode & 0o7777,
		uid:      hdr.Uid,
		gid:      hdr.Gid,
		devmajor: hdr.Devmajor,
		devminor: hdr.Devminor,
		mtime:    hdr.ModTime,
		atime:    hdr.AccessTime,
		ctime:    hdr.ChangeTime,
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont:
		m.typ = tar.TypeReg
		m.size = hdr.Size
	case tar.TypeSymlink:
		if hdr.Linkname == "" || len(hdr.Linkname) > maxPathLen || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return meta{}, fmt.Errorf("%w: symlink %q has an invalid target", ErrInvalid, hdr.Name)
		}
		m.linkname = hdr.Linkname
	}
	if m.uid < 0 || m.gid < 0 || int64(m.uid) > math.MaxUint32 || int64(m.gid) > math.MaxUint32 {
		return meta{}, fmt.Errorf("%w: %q has owner %d:%d out of range", ErrInvalid, hdr.Name, m.uid, m.gid)
	}
	if m.devmajor < 0 || m.devminor < 0 || m.devmajor > math.MaxUint32 || m.devminor > math.MaxUint32 {
		return meta{}, fmt.Errorf("%w: %q has device numbers out of range", ErrInvalid, hdr.Name)
	}
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || strings.HasPrefix(name, overlayXattrPrefix) || name == "" {
			continue
		}
		if m.xattrs == nil {
			m.xattrs = map[string]string{}
		}
		m.xattrs[name] = v
	}
	return m, nil
}

// plan assigns every inode its canonical path and returns what to emit:
// directories parents first, the other inodes, and the extra names of hard
// linked inodes. The walk is sorted, so equal trees give equal output.
func (t *tree) plan() (dirs []*dentry, files []*inode, links []link) {
	var walk func(d *dentry, p string)
	walk = func(d *dentry, p string) {
		names := make([]string, 0, len(d.children))
		for n := range d.children {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			c := d.children[n]
			cp := n
			if p != "" {
				cp = p + "/" + n
			}
			if c.isDir() {
				c.ino.path = cp
				dirs = append(dirs, c)
				walk(c, cp)
				continue
			}
			if c.ino.path == "" {
				c.ino.path = cp
				files = append(files, c.ino)
			} else {
				links = append(links, link{path: cp, ino: c.ino})
			}
		}
	}
	for _, d := range []*dentry{t.root} {
		d.ino.path = ""
		walk(d, "")
	}
	return dirs, files, links
}

// link is an extra name for an inode already emitted.
type link struct {
	path string
	ino  *inode
}

// header builds the tar header the flattened stream carries for m at p.
func header(p string, m *meta) *tar.Header {
	h := &tar.Header{
		Typeflag:   m.typ,
		Name:       p,
		Mode:       m.mode,
		Uid:        m.uid,
		Gid:        m.gid,
		Linkname:   m.linkname,
		Devmajor:   m.devmajor,
		Devminor:   m.devminor,
		ModTime:    m.mtime,
		AccessTime: m.atime,
		ChangeTime: m.ctime,
		Format:     tar.FormatPAX,
	}
	switch m.typ {
	case tar.TypeReg:
		h.Size = m.size
	case tar.TypeDir:
		h.Name = p + "/"
		if p == "" {
			h.Name = "./"
		}
	}
	if len(m.xattrs) > 0 {
		h.PAXRecords = make(map[string]string, len(m.xattrs))
		for k, v := range m.xattrs {
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	return h
}
