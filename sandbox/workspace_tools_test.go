package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"matchlock.dev/matchlock/image"
)

// The guest environment of the tools tests: fixed identities, no system or
// global git configuration.
var toolsEnv = []string{
	"PATH=/usr/bin:/bin", "HOME=/root", "TERM=dumb",
	"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null",
	"GIT_AUTHOR_NAME=Guest", "GIT_AUTHOR_EMAIL=guest@sandbox.test",
	"GIT_COMMITTER_NAME=Guest", "GIT_COMMITTER_EMAIL=guest@sandbox.test",
}

// fixedSource is an ImageSource with one root disk for every reference.
type fixedSource struct{ path string }

func (s fixedSource) Rootfs(context.Context, string) (string, ImageConfig, error) {
	return s.path, ImageConfig{Env: toolsEnv}, nil
}

// toolsImage builds scripts/mkimage-tools.sh's tarball (busybox, the host's
// git and sqlite3 with their libraries) and imports it into a temporary
// image store, as `matchlock image import` does; it returns the root disk.
func toolsImage(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "..", "scripts", "mkimage-tools.sh")
	dir := t.TempDir()
	tarPath := filepath.Join(dir, "tools.tar")
	if out, err := exec.Command("bash", script, tarPath).CombinedOutput(); err != nil {
		t.Fatalf("mkimage-tools.sh: %v\n%s", err, out)
	}
	st, err := image.Open(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f, err := os.Open(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	img, err := st.Import(ctx, "tools:test", f)
	if err != nil {
		t.Fatal(err)
	}
	p, err := st.Rootfs(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// newToolsSandbox boots a VM from the tools image with share read-write at
// /workspace.
func newToolsSandbox(t *testing.T, share string) *Sandbox {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM")
	}
	return bootTestSandbox(t, Options{Image: "tools", Images: fixedSource{toolsImage(t)},
		MemoryMiB: 256, DiskSizeMiB: 256, NoNetwork: true,
		Mounts: []Mount{{Source: share, Target: "/workspace"}}})
}

// toolsSh runs a shell script in the guest with toolsEnv and returns its
// stdout; a nonzero exit, or no exit within two minutes, fails the test.
func toolsSh(t *testing.T, sb *Sandbox, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	p, err := sb.Exec(ctx, ExecOptions{Argv: []string{"/bin/sh", "-c", script}, Env: toolsEnv})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	var wg sync.WaitGroup
	var stdout, stderr bytes.Buffer
	wg.Add(2)
	go func() { defer wg.Done(); stdout.ReadFrom(p.Stdout()) }()
	go func() { defer wg.Done(); stderr.ReadFrom(p.Stderr()) }()
	st, err := p.Wait(ctx)
	if err != nil {
		p.Close() // ends the readers (and drops what they had not read)
	}
	wg.Wait() // the output channels end before the exit message
	p.Close()
	t.Logf("guest script took %v", time.Since(t0).Round(time.Millisecond))
	if err != nil || st.Code != 0 {
		t.Fatalf("guest script: exit %d, %v\n--- stdout:\n%s\n--- stderr:\n%s\n--- script:\n%s", st.Code, err, &stdout, &stderr, script)
	}
	if stderr.Len() > 0 {
		t.Logf("guest stderr:\n%s", &stderr)
	}
	return stdout.String()
}

// hostRun runs a host program (git, sqlite3) and returns its stdout.
func hostRun(t *testing.T, env []string, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir, cmd.Env = dir, env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("host %s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, &stderr)
	}
	return string(out)
}

// TestShareTools runs real programs in the guest on a read-write share and
// checks the result with the same programs on the host: git (a local clone,
// status, commit), sqlite3 (a 2000-row transaction, WAL mode with a reader
// holding a snapshot while another process commits) and an npm-install-style
// storm of small files staged and renamed into node_modules.
func TestShareTools(t *testing.T) {
	for _, tool := range []string{"git", "sqlite3"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed on the host (apt-get install %s)", tool, tool)
		}
	}
	base := t.TempDir()
	share := filepath.Join(base, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	hostEnv := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + base, "LC_ALL=C",
		"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null",
		"GIT_AUTHOR_NAME=Host", "GIT_AUTHOR_EMAIL=host@host.test",
		"GIT_COMMITTER_NAME=Host", "GIT_COMMITTER_EMAIL=host@host.test"}
	git := func(dir string, args ...string) string { return hostRun(t, hostEnv, dir, "git", args...) }

	// A repository with three commits on the host, cloned bare into the share.
	work := filepath.Join(base, "work")
	git(base, "init", "-q", "-b", "main", work)
	files := []map[string]string{
		{"README.md": "# demo\n", "src/main.c": "int main(void) { return 0; }\n"},
		{"run.sh": "#!/bin/sh\necho run\n", "src/util.c": "int util(void) { return 1; }\n"},
		{"README.md": "# demo\n\nThird revision.\n", "docs/guide.md": "Read me.\n"},
	}
	for i, fs := range files {
		for name, content := range fs {
			p := filepath.Join(work, name)
			os.MkdirAll(filepath.Dir(p), 0o755)
			mode := os.FileMode(0o644)
			if strings.HasSuffix(name, ".sh") {
				mode = 0o755
			}
			if err := os.WriteFile(p, []byte(content), mode); err != nil {
				t.Fatal(err)
			}
		}
		git(work, "add", "-A")
		date := fmt.Sprintf("GIT_AUTHOR_DATE=2024-01-0%d 12:00:00 +0000", i+1)
		hostRun(t, append(hostEnv, date, "GIT_COMMITTER_"+date[len("GIT_AUTHOR_"):]), work, "git", "commit", "-q", "-m", fmt.Sprintf("commit %d", i+1))
	}
	git(base, "clone", "-q", "--bare", work, filepath.Join(share, "src.git"))
	firstCommit := strings.TrimSpace(git(work, "rev-parse", "HEAD~2"))

	sb := newToolsSandbox(t, share)

	t.Run("git", func(t *testing.T) {
		clone := filepath.Join(share, "clone")
		out := toolsSh(t, sb, `set -e
git clone -q /workspace/src.git /workspace/clone
cd /workspace/clone
echo "clean:[$(git status --porcelain)]"
git log --format=%s
ls -l run.sh | cut -c1-10`)
		if want := "clean:[]\ncommit 3\ncommit 2\ncommit 1\n-rwxr-xr-x\n"; out != want {
			t.Fatalf("after the clone the guest sees:\n%s\nwant:\n%s", out, want)
		}
		// A local clone hardlinks the objects: link(2) inside the share.
		obj := filepath.Join("objects", firstCommit[:2], firstCommit[2:])
		a, errA := os.Stat(filepath.Join(share, "src.git", obj))
		b, errB := os.Stat(filepath.Join(clone, ".git", obj))
		if errA != nil || errB != nil || !os.SameFile(a, b) {
			t.Errorf("clone's object %s is not a hardlink of the source's (%v, %v)", obj, errA, errB)
		}

		out = toolsSh(t, sb, `set -e
cd /workspace/clone
echo "guest line" >> README.md
echo new > notes.txt
git status --porcelain`)
		if want := " M README.md\n?? notes.txt\n"; out != want {
			again := toolsSh(t, sb, "cd /workspace/clone; ls -la; stat README.md; git status --porcelain")
			t.Fatalf("status after changes:\n%q\nwant %q\nthe guest, again:\n%s\nthe host: %q", out, want, again, git(clone, "status", "--porcelain"))
		}
		out = toolsSh(t, sb, `set -e
cd /workspace/clone
git add -A
git commit -q -m "guest commit"
echo "clean:[$(git status --porcelain)]"
git rev-parse HEAD`)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 2 || lines[0] != "clean:[]" || len(lines[1]) != 40 {
			t.Fatalf("after the commit the guest says:\n%s", out)
		}
		guestHead := lines[1]

		// The host's git agrees.
		if head := strings.TrimSpace(git(clone, "rev-parse", "HEAD")); head != guestHead {
			t.Errorf("host HEAD %s, guest HEAD %s", head, guestHead)
		}
		if log := git(clone, "log", "--format=%an %s"); log != "Guest guest commit\nHost commit 3\nHost commit 2\nHost commit 1\n" {
			t.Errorf("host git log:\n%s", log)
		}
		if names := git(clone, "show", "--name-status", "--format=", "HEAD"); names != "M\tREADME.md\nA\tnotes.txt\n" {
			t.Errorf("host: the guest commit changes:\n%s", names)
		}
		if readme := git(clone, "show", "HEAD:README.md"); readme != "# demo\n\nThird revision.\nguest line\n" {
			t.Errorf("host: README.md in the guest commit: %q", readme)
		}
		if st := git(clone, "status", "--porcelain"); st != "" {
			t.Errorf("host: the clone is not clean:\n%s", st)
		}
		git(clone, "fsck", "--full", "--strict", "--no-progress")
	})

	t.Run("sqlite", func(t *testing.T) {
		inserts := func(from, to int) string {
			return fmt.Sprintf(`seq %d %d | awk '{ printf "INSERT INTO items(name, n) VALUES(%%citem-%%d%%c, %%d);\n", 39, $1, 39, $1 * 7 }'`, from, to)
		}
		// A reader process opens a read transaction, tells the script, and
		// waits (FIFOs in the guest's /tmp) while a second process commits 500
		// rows: WAL keeps the reader's snapshot, shared through the mmap'ed
		// -shm file in the share.
		out := toolsSh(t, sb, `set -e
cd /workspace
{ echo 'PRAGMA journal_mode=WAL;'
  echo 'CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, n INTEGER NOT NULL);'
  echo 'BEGIN;'
  `+inserts(1, 2000)+`
  echo 'COMMIT;'
  echo 'CREATE INDEX items_n ON items(n);'
  echo "SELECT 'even', count(*), sum(n) FROM items WHERE n % 2 = 0;"
} | sqlite3 -bail app.db
mkfifo /tmp/started /tmp/written
cat > /tmp/reader.sql <<'EOF'
BEGIN;
SELECT 'reader-before', count(*) FROM items;
.system echo >/tmp/started
.system read x </tmp/written
SELECT 'reader-snapshot', count(*) FROM items;
COMMIT;
SELECT 'reader-after', count(*) FROM items;
EOF
sqlite3 -bail app.db </tmp/reader.sql >/tmp/reader.out 2>&1 &
reader=$!
read x </tmp/started
{ echo 'BEGIN;'
  `+inserts(2001, 2500)+`
  echo 'COMMIT;'
  echo "SELECT 'writer', count(*) FROM items;"
} | sqlite3 -bail app.db
ls /workspace | grep '^app.db-wal$'
echo >/tmp/written
wait $reader
cat /tmp/reader.out
sqlite3 -bail app.db "PRAGMA integrity_check; SELECT 'by-index', count(*) FROM items WHERE n BETWEEN 7000 AND 7699;"`)
		want := "wal\neven|1000|7007000\nwriter|2500\napp.db-wal\nreader-before|2000\nreader-snapshot|2000\nreader-after|2500\nok\nby-index|100\n"
		if out != want {
			t.Fatalf("guest sqlite3 output:\n%s\nwant:\n%s", out, want)
		}
		// 7 × (1 + … + 2500) = 21883750.
		got := hostRun(t, hostEnv, share, "sqlite3", "-bail", "app.db",
			"PRAGMA integrity_check; PRAGMA journal_mode; SELECT count(*), sum(n), max(id) FROM items; SELECT name FROM items WHERE id = 1234;")
		if want := "ok\nwal\n2500|21883750|2500\nitem-1234\n"; got != want {
			t.Fatalf("host sqlite3:\n%s\nwant:\n%s", got, want)
		}
	})

	t.Run("npm-storm", func(t *testing.T) {
		// Like a package manager: each package is unpacked into a staging
		// directory (package.json, index.js, lib/NAME.js) and renamed into
		// node_modules.
		const pkgs = 300
		out := toolsSh(t, sb, fmt.Sprintf(`set -e
cd /workspace
mkdir -p node_modules/.staging
i=0
while [ $i -lt %d ]; do
  p=pkg-$i s=node_modules/.staging/pkg-$i
  mkdir -p $s/lib
  printf '{"name":"%%s","version":"1.0.%%d","main":"index.js"}\n' $p $i >$s/package.json
  printf 'module.exports = require("./lib/%%s.js");\n' $p >$s/index.js
  printf 'module.exports = %%d;\n' $i >$s/lib/$p.js
  mv $s node_modules/$p
  i=$((i + 1))
done
rmdir node_modules/.staging
find node_modules | wc -l`, pkgs))
		want := 1 + pkgs*5 // node_modules, and per package: itself, lib, three files
		if strings.TrimSpace(out) != fmt.Sprint(want) {
			t.Fatalf("guest find counts %q, want %d", out, want)
		}
		if n := strings.TrimSpace(hostRun(t, hostEnv, share, "sh", "-c", "find node_modules | wc -l")); n != fmt.Sprint(want) {
			t.Fatalf("host find counts %s, want %d", n, want)
		}
		for i := 0; i < pkgs; i++ {
			dir := filepath.Join(share, "node_modules", fmt.Sprintf("pkg-%d", i))
			for name, content := range map[string]string{
				"package.json":                  fmt.Sprintf(`{"name":"pkg-%d","version":"1.0.%d","main":"index.js"}`+"\n", i, i),
				"index.js":                      fmt.Sprintf("module.exports = require(\"./lib/pkg-%d.js\");\n", i),
				fmt.Sprintf("lib/pkg-%d.js", i): fmt.Sprintf("module.exports = %d;\n", i),
			} {
				if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || string(b) != content {
					t.Fatalf("host: %s/%s is %q (%v), want %q", dir, name, b, err, content)
				}
			}
		}
	})
}
