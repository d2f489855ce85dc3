package build

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

func TestParseDockerfile(t *testing.T) {
	df := "# syntax=docker/dockerfile:1\n# check=skip=all\nARG BASE=alpine\nARG TAG\n" +
		"FROM --platform=$BUILDPLATFORM ${BASE}:${TAG:-3.19} AS build\n" +
		"RUN <<EOF\nFROM not-an-image\nEOF\n" +
		"COPY --from=busybox:1.36 /bin/busybox /bb\n" +
		"RUN --mount=type=bind,from=tools,target=/t \\\n  true\n" +
		"FROM scratch\nCOPY --from=build /x /x\nCOPY --from=0 /y /y\nFROM build\n"
	got := ParseDockerfile([]byte(df), map[string]string{"TAG": "edge"})
	if want := []string{"alpine:edge", "busybox:1.36", "tools"}; strings.Join(got.Images, " ") != strings.Join(want, " ") {
		t.Errorf("images %q, want %q", got.Images, want)
	}
	if got.SyntaxIgnored != "docker/dockerfile:1" {
		t.Errorf("syntax %q", got.SyntaxIgnored)
	}
	if !strings.HasPrefix(string(got.Text), "#\n# check=skip=all\n") || strings.Count(string(got.Text), "\n") != strings.Count(df, "\n") {
		t.Errorf("text not neutralised line for line:\n%s", got.Text)
	}
	// A syntax line after an instruction is a comment, not a directive.
	if d := ParseDockerfile([]byte("FROM a\n# syntax=x\n"), nil); d.SyntaxIgnored != "" || len(d.Images) != 1 {
		t.Errorf("late syntax comment: %+v", d)
	}
}

func TestIgnore(t *testing.T) {
	ig, err := ParseIgnore(strings.NewReader("# c\n*.log\n/build\n**/node_modules\ndocs/*.md\n!docs/keep.md\ntmp?\n"))
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{
		"a.log": true, "sub/a.log": false, "build": true, "build/x": true, "src/build": false,
		"node_modules/x": true, "a/b/node_modules": true, "docs/a.md": true, "docs/keep.md": false,
		"tmp1": true, "tmp12": false, "main.go": false,
	} {
		if got := ig.Excluded(p); got != want {
			t.Errorf("Excluded(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestWriteContext(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"a.txt", "skip/x", "keep/y.tmp", "keep/z.txt"} {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(f)), 0o755)
		os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644)
	}
	os.Symlink("a.txt", filepath.Join(dir, "link"))
	ig, _ := ParseIgnore(strings.NewReader("skip\n*/*.tmp\n"))
	var buf bytes.Buffer
	if _, err := WriteContext(dir, ig, &buf); err != nil {
		t.Fatal(err)
	}
	var names []string
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	sort.Strings(names)
	if got := strings.Join(names, " "); got != "a.txt keep/ keep/z.txt link" {
		t.Errorf("context tar: %s", got)
	}
}

func TestParseBuildError(t *testing.T) {
	out := `#6 [2/3] RUN echo hi && exit 7
#6 0.101 hi
#6 ERROR: process "/bin/sh -c echo hi && exit 7" did not complete successfully: exit code: 7
------
 > [2/3] RUN echo hi && exit 7:
0.101 hi
------
Dockerfile:3
--------------------
   1 |     FROM busybox
   3 | >>> RUN echo hi && exit 7
--------------------
error: failed to solve: process "/bin/sh -c echo hi && exit 7" did not complete successfully: exit code: 7
`
	e := parseBuildError(out, 1)
	if e.Step != "[2/3] RUN echo hi && exit 7" || e.Location != "Dockerfile:3" || e.ExitCode != 7 {
		t.Errorf("%+v", e)
	}
	if got := e.Error(); got != "build failed at [2/3] RUN echo hi && exit 7 (Dockerfile:3): exit code 7" {
		t.Errorf("Error() = %q", got)
	}
	if e := parseBuildError("error: failed to solve: dockerfile parse error on line 2: unknown instruction: FOO\n", 1); e.ExitCode != -1 || !strings.Contains(e.Error(), "unknown instruction") {
		t.Errorf("%+v", e)
	}
}

func TestContextKey(t *testing.T) {
	for in, want := range map[string]string{
		"busybox": "busybox", "busybox:latest": "busybox", "docker.io/library/alpine:3.19": "alpine:3.19",
		"localhost:5000/app:1": "localhost:5000/app:1", "user/img": "user/img",
	} {
		if got, err := contextKey(in); err != nil || got != want {
			t.Errorf("contextKey(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
