package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// builderReady makes sure the builder image exists (scripts/build-builder.sh
// is a near-instant no-op once it has run; .ci/run runs it before the
// tests). The image is cached outside the tests' private cache.
func builderReady(t *testing.T) {
	t.Helper()
	out, err := exec.Command(filepath.Join(repoRoot, "scripts", "build-builder.sh")).CombinedOutput()
	if err != nil {
		t.Fatalf("build-builder.sh: %v\n%s", err, out)
	}
}

func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

const buildDockerfile = `# syntax=docker/dockerfile:1.7
ARG BASE=busybox
FROM ${BASE} AS deps
ARG GREETING=hi
RUN --mount=type=cache,target=/cache echo "$GREETING" > /greeting && echo run >> /cache/n
RUN <<EOF
echo line1 > /heredoc
echo line2 >> /heredoc
EOF

FROM busybox:latest AS final
COPY --from=deps /greeting /out/greeting
COPY --from=deps /heredoc /out/heredoc
COPY . /src/
USER 1000:1000
WORKDIR /work
ENV APP_MODE=prod
EXPOSE 8080/tcp
LABEL org.example.team=matchlock
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /out/greeting; ls -A /src | tr '\\n' ' '; echo; id -u; pwd; echo $APP_MODE"]

FROM busybox AS unused
RUN echo not-built > /unused
`

// TestBuild builds real Dockerfiles offline from busybox:latest: a
// multi-stage build with build args, --target, COPY --from, a cache mount,
// a heredoc, .dockerignore and image config; a cached rebuild; a failing
// RUN; a RUN refused by the sealed network; then runs the result.
func TestBuild(t *testing.T) {
	builderReady(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{
		"Dockerfile":     buildDockerfile,
		".dockerignore":  "# comment\nsecret.env\nlogs\n*.tmp\n!keep.tmp\n",
		"keep.txt":       "keep\n",
		"keep.tmp":       "exception\n",
		"drop.tmp":       "dropped\n",
		"secret.env":     "TOKEN=x\n",
		"logs/a.log":     "log\n",
		"sub/nested.txt": "nested\n",
	})
	args := []string{"build", "-t", "built:1", "--build-arg", "GREETING=hello-from-arg", "--target", "final", dir}

	t0 := time.Now()
	cold := mustRun(t, args...)
	coldDur := time.Since(t0)
	if !strings.Contains(cold.stderr, "ignoring '# syntax=docker/dockerfile:1.7'") {
		t.Errorf("no notice of the ignored syntax directive:\n%s", cold.stderr)
	}
	if !strings.Contains(cold.stderr, "RUN <<EOF") || strings.Contains(cold.stderr, "not-built") {
		t.Errorf("progress does not show the heredoc step, or the unused stage ran:\n%s", cold.stderr)
	}
	if !strings.Contains(cold.stdout, "built:1") {
		t.Errorf("stdout: %q", cold.stdout)
	}

	t0 = time.Now()
	warm := mustRun(t, args...)
	warmDur := time.Since(t0)
	t.Logf("cold build %.1fs, cached rebuild %.1fs", coldDur.Seconds(), warmDur.Seconds())
	t.Logf("cold: %s", lastLine(cold.stderr))
	t.Logf("warm: %s", lastLine(warm.stderr))
	if !strings.Contains(warm.stderr, "CACHED") {
		t.Errorf("rebuild did not hit the cache:\n%s", warm.stderr)
	}
	if warmDur >= coldDur {
		t.Errorf("cached rebuild (%v) not faster than the cold build (%v)", warmDur, coldDur)
	}
	digest := func(s string) string { _, d, _ := strings.Cut(s, "digest: "); return strings.TrimSpace(d) }
	if digest(cold.stdout) != digest(warm.stdout) {
		t.Errorf("rebuild changed the digest: %q vs %q", cold.stdout, warm.stdout)
	}

	// The built image runs with its ENTRYPOINT/CMD/USER/WORKDIR/ENV.
	r := mustRun(t, "run", "--image", "built:1")
	for _, w := range []string{"hello-from-arg", "1000", "/work", "prod"} {
		if !strings.Contains(r.stdout, w) {
			t.Errorf("run output lacks %q:\n%s", w, r.stdout)
		}
	}
	if lines := strings.Split(r.stdout, "\n"); len(lines) < 2 ||
		strings.Join(strings.Fields(lines[1]), " ") != ".dockerignore Dockerfile keep.tmp keep.txt sub" {
		t.Errorf("context in the image (.dockerignore applied):\n%s", r.stdout)
	}
	if r := mustRun(t, "run", "--image", "built:1", "--entrypoint", "cat", "/out/heredoc"); r.stdout != "line1\nline2\n" {
		t.Errorf("heredoc: %q", r.stdout)
	}
	ins := mustRun(t, "image", "inspect", "built:1")
	var img struct {
		Config struct {
			Entrypoint, Cmd, Env, ExposedPorts []string
			User, WorkingDir                   string
			Labels                             map[string]string
		}
	}
	if err := json.Unmarshal([]byte(ins.stdout), &img); err != nil {
		t.Fatal(err)
	}
	c := img.Config
	if c.User != "1000:1000" || c.WorkingDir != "/work" || strings.Join(c.ExposedPorts, ",") != "8080/tcp" ||
		c.Labels["org.example.team"] != "matchlock" || strings.Join(c.Entrypoint, " ") != "/bin/sh -c" ||
		!strings.Contains(strings.Join(c.Env, " "), "APP_MODE=prod") {
		t.Errorf("image config: %+v", c)
	}

	// A failing RUN: its step, line and exit code, and a non-zero exit.
	fail := filepath.Join(t.TempDir(), "fail")
	writeTree(t, fail, map[string]string{"Dockerfile": "FROM busybox\nRUN echo fine\nRUN echo about to fail && exit 7\n"})
	fr := ml(t, nil, "build", "-t", "fail:1", fail)
	if fr.code == 0 {
		t.Fatalf("failing build exited 0:\n%s", fr.stderr)
	}
	last := lastLine(fr.stderr)
	t.Logf("failing RUN: exit %d, %s", fr.code, last)
	for _, w := range []string{"RUN echo about to fail && exit 7", "Dockerfile:3", "exit code 7"} {
		if !strings.Contains(last, w) {
			t.Errorf("failure message lacks %q: %q", w, last)
		}
	}
	if r := ml(t, nil, "image", "inspect", "fail:1"); r.code == 0 {
		t.Errorf("a failed build left an image")
	}

	// The sealed network: a RUN reaching a host outside the allow-list
	// fails (by IP: busybox cannot resolve names here).
	netDir := filepath.Join(t.TempDir(), "net")
	writeTree(t, netDir, map[string]string{"Dockerfile": "FROM busybox\nRUN nc -w 5 1.2.3.4 80 </dev/null\n"})
	nr := ml(t, nil, "build", "-t", "net:1", "--allow-host", "example.com", netDir)
	t.Logf("sealed network: exit %d, %s", nr.code, lastLine(nr.stderr))
	if nr.code == 0 || !strings.Contains(lastLine(nr.stderr), "RUN nc -w 5 1.2.3.4 80") {
		t.Errorf("egress outside the allow-list: exit %d, %q", nr.code, lastLine(nr.stderr))
	}

	// An allowed host is reachable from RUN, and a --secret reaches RUN
	// --mount=type=secret as its placeholder, never as the value.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "upstream-ok") }))
	defer srv.Close()
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	okDir := filepath.Join(t.TempDir(), "allowed")
	writeTree(t, okDir, map[string]string{"Dockerfile": fmt.Sprintf("FROM busybox\nCOPY netprobe /netprobe\n"+
		"RUN /netprobe get http://api.test:%d/ > /fetched\n"+
		"RUN --mount=type=secret,id=TOKEN cat /run/secrets/TOKEN > /token-seen\n", port)})
	probe, err := os.ReadFile(netprobe(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(okDir, "netprobe"), probe, 0o755); err != nil {
		t.Fatal(err)
	}
	hp := fmt.Sprintf("api.test:%d", port)
	mustRun(t, "build", "-t", "net:2", "--add-host", "api.test:127.0.0.1", "--allow-host", hp, "--allow-private", hp,
		"--secret", "TOKEN=s3cr3t-value@api.test", okDir)
	r = mustRun(t, "run", "--image", "net:2", "cat", "/fetched", "/token-seen")
	if !strings.Contains(r.stdout, "upstream-ok") || !strings.Contains(r.stdout, "SANDBOX_SECRET_") || strings.Contains(r.stdout, "s3cr3t") {
		t.Errorf("allowed host / secret placeholder: %q", r.stdout)
	}

	// Prune resets the cache.
	if r := mustRun(t, "build", "prune"); !strings.Contains(r.stdout, "build cache reset") {
		t.Errorf("prune: %q", r.stdout)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "builder", "cache.ext4")); !os.IsNotExist(err) {
		t.Errorf("cache disk still there after prune: %v", err)
	}
}

// TestBuildPrebuildForm: `matchlock build IMAGE` (one argument, no -t/-f)
// prepares IMAGE's root disk; a context directory without -t is refused.
func TestBuildPrebuildForm(t *testing.T) {
	r := mustRun(t, "build", "busybox:latest")
	if !strings.Contains(r.stdout, "root disk") {
		t.Errorf("stdout: %q", r.stdout)
	}
	if r := ml(t, nil, "build", t.TempDir()); r.code == 0 || !strings.Contains(r.stderr, "-t TAG is required") {
		t.Errorf("a context without -t: exit %d, %q", r.code, r.stderr)
	}
}

func lastLine(s string) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	return ls[len(ls)-1]
}
