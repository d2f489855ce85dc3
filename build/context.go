package build

import (
	"archive/tar"
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
)

// Ignore is a .dockerignore: patterns in Go's filepath.Match syntax plus
// `**` (any number of directories), matched against slash-separated paths
// relative to the context root; a pattern that matches a directory
// excludes everything under it; `!pattern` re-includes; the last matching
// line wins; `#` lines are comments.
type Ignore struct {
	rules      []ignoreRule
	exceptions bool
}

type ignoreRule struct {
	re     *regexp.Regexp
	negate bool
}

// ReadIgnore reads dir/.dockerignore; a missing file ignores nothing.
func ReadIgnore(dir string) (*Ignore, error) {
	f, err := os.Open(filepath.Join(dir, ".dockerignore"))
	if os.IsNotExist(err) {
		return &Ignore{}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseIgnore(f)
}

// ParseIgnore parses .dockerignore text.
func ParseIgnore(r io.Reader) (*Ignore, error) {
	ig := &Ignore{}
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		neg := false
		if strings.HasPrefix(p, "!") {
			neg = true
			p = strings.TrimSpace(p[1:])
		}
		p = path.Clean(filepath.ToSlash(p))
		p = strings.TrimPrefix(p, "/")
		if p == "." || p == "" {
			if !neg {
				p = "**"
			} else {
				continue
			}
		}
		re, err := patternRegexp(p)
		if err != nil {
			return nil, fmt.Errorf(".dockerignore line %d: %q: %v", n, p, err)
		}
		ig.rules = append(ig.rules, ignoreRule{re: re, negate: neg})
		ig.exceptions = ig.exceptions || neg
	}
	return ig, sc.Err()
}

func patternRegexp(p string) (*regexp.Regexp, error) {
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch c {
		case '*':
			if i+1 < len(p) && p[i+1] == '*' {
				i++
				if i+1 < len(p) && p[i+1] == '/' {
					i++
					b.WriteString("(.*/)?")
				} else {
					b.WriteString(".*")
				}
			} else {
				b.WriteString("[^/]*")
			}
		case '?':
			b.WriteString("[^/]")
		case '[':
			j := strings.IndexByte(p[i:], ']')
			if j < 0 {
				return nil, fmt.Errorf("unterminated [")
			}
			cls := p[i+1 : i+j]
			if strings.HasPrefix(cls, "!") {
				cls = "^" + cls[1:]
			}
			b.WriteString("[" + cls + "]")
			i += j
		case '\\':
			if i+1 < len(p) {
				i++
				b.WriteString(regexp.QuoteMeta(string(p[i])))
			}
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("$")
	return regexp.Compile(b.String())
}

// Excluded reports whether rel (slash-separated, relative to the context
// root) is excluded: by a pattern matching it or one of its parents.
func (ig *Ignore) Excluded(rel string) bool {
	if len(ig.rules) == 0 {
		return false
	}
	// Candidates: the path and every parent of it.
	var cands []string
	for p := rel; p != "." && p != "/" && p != ""; p = path.Dir(p) {
		cands = append(cands, p)
	}
	excluded := false
	for _, r := range ig.rules {
		for _, c := range cands {
			if r.re.MatchString(c) {
				excluded = !r.negate
				break
			}
		}
	}
	return excluded
}

// ContextStats counts what went into a context tar.
type ContextStats struct {
	Files, Dirs, Skipped int
	Bytes                int64
}

// WriteContext writes the build context dir as a tar to w: regular files,
// directories and symlinks (not followed), modes kept, owned by root,
// without what ig excludes. Special files are skipped.
func WriteContext(dir string, ig *Ignore, w io.Writer) (ContextStats, error) {
	var st ContextStats
	tw := tar.NewWriter(w)
	written := map[string]bool{}
	var ensureParents func(rel string) error
	ensureParents = func(rel string) error {
		parent := path.Dir(rel)
		if parent == "." || written[parent] {
			return nil
		}
		if err := ensureParents(parent); err != nil {
			return err
		}
		fi, err := os.Lstat(filepath.Join(dir, filepath.FromSlash(parent)))
		if err != nil {
			return err
		}
		written[parent] = true
		st.Dirs++
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: parent + "/", Mode: int64(fi.Mode().Perm()), ModTime: fi.ModTime()})
	}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		if ig.Excluded(rel) {
			st.Skipped++
			if d.IsDir() && !ig.exceptions {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if err := ensureParents(rel); err != nil {
			return err
		}
		hdr := &tar.Header{Name: rel, Mode: int64(fi.Mode().Perm() | fi.Mode()&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)), ModTime: fi.ModTime()}
		switch {
		case fi.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
			written[rel] = true
			st.Dirs++
			return tw.WriteHeader(hdr)
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
			st.Files++
			return tw.WriteHeader(hdr)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			hdr.Typeflag, hdr.Size = tar.TypeReg, fi.Size()
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			n, err := io.Copy(tw, f)
			st.Files++
			st.Bytes += n
			return err
		default:
			st.Skipped++
			return nil
		}
	})
	if err != nil {
		return st, fmt.Errorf("build context %s: %w", dir, err)
	}
	return st, tw.Close()
}
