package build

import (
	"bufio"
	"bytes"
	"regexp"
	"strconv"
	"strings"
)

// Dockerfile is what matchlock needs to know of a Dockerfile before
// BuildKit sees it.
type Dockerfile struct {
	// Text is the Dockerfile with any `# syntax=` directive blanked out
	// (line numbers are kept): the built-in dockerfile.v0 frontend is
	// always used and no frontend image is ever fetched.
	Text []byte
	// SyntaxIgnored is the directive's value when one was blanked.
	SyntaxIgnored string
	// Images are the external images the build reads (FROM, COPY --from,
	// RUN --mount from=), after global ARG expansion, in first-use order.
	// Stage names, stage numbers and scratch are not in it.
	Images []string
	// Stages are the stage names (AS …), lowercased.
	Stages []string
}

var syntaxRe = regexp.MustCompile(`(?i)^#\s*syntax\s*=\s*(.*?)\s*$`)
var directiveRe = regexp.MustCompile(`^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=`)
var heredocRe = regexp.MustCompile(`<<(-?)\s*(["']?)([A-Za-z_][A-Za-z0-9_]*)(["']?)`)

// ParseDockerfile scans df: it neutralises the syntax directive and
// collects the images to resolve. It is a scanner, not a parser: BuildKit
// reports syntax errors, with line numbers, when it parses the text.
// buildArgs are the --build-arg values (KEY=VALUE) that may override
// global ARG defaults in FROM lines.
func ParseDockerfile(df []byte, buildArgs map[string]string) *Dockerfile {
	out := &Dockerfile{}
	lines := strings.SplitAfter(string(df), "\n")
	// Parser directives: leading comment lines of the form `# key=value`.
	for i, l := range lines {
		t := strings.TrimSpace(l)
		if !directiveRe.MatchString(t) {
			break
		}
		if m := syntaxRe.FindStringSubmatch(t); m != nil {
			out.SyntaxIgnored = m[1]
			nl := ""
			if strings.HasSuffix(l, "\n") {
				nl = "\n"
			}
			lines[i] = "#" + nl
		}
	}
	out.Text = []byte(strings.Join(lines, ""))

	global := map[string]string{}
	seenFrom := false
	stages := map[string]bool{}
	seenImg := map[string]bool{}
	addImage := func(ref string) {
		ref = expand(ref, global)
		l := strings.ToLower(ref)
		if ref == "" || l == "scratch" || stages[l] || seenImg[ref] {
			return
		}
		if _, err := strconv.Atoi(ref); err == nil { // COPY --from=0
			return
		}
		seenImg[ref] = true
		out.Images = append(out.Images, ref)
	}
	for _, ins := range instructions(out.Text) {
		words := strings.Fields(ins)
		if len(words) == 0 {
			continue
		}
		cmd := strings.ToUpper(words[0])
		args := words[1:]
		switch cmd {
		case "ARG":
			if seenFrom {
				continue
			}
			for _, a := range args {
				k, v, hasDefault := strings.Cut(a, "=")
				v = unquote(v)
				if bv, ok := buildArgs[k]; ok {
					global[k] = bv
				} else if hasDefault {
					global[k] = expand(v, global)
				} else {
					global[k] = ""
				}
			}
		case "FROM":
			seenFrom = true
			var rest []string
			for _, a := range args {
				if !strings.HasPrefix(a, "--") {
					rest = append(rest, a)
				}
			}
			if len(rest) == 0 {
				continue
			}
			addImage(rest[0])
			if len(rest) >= 3 && strings.EqualFold(rest[1], "AS") {
				name := strings.ToLower(rest[2])
				stages[name] = true
				out.Stages = append(out.Stages, name)
			}
		case "COPY", "ADD", "RUN":
			for _, a := range args {
				if !strings.HasPrefix(a, "--") {
					break
				}
				if v, ok := strings.CutPrefix(a, "--from="); ok {
					addImage(unquote(v))
				}
				if v, ok := strings.CutPrefix(a, "--mount="); ok {
					for _, kv := range strings.Split(v, ",") {
						if f, ok := strings.CutPrefix(kv, "from="); ok {
							addImage(unquote(f))
						}
					}
				}
			}
		}
	}
	return out
}

// instructions joins continuation lines, drops comments and skips heredoc
// bodies, returning one string per instruction.
func instructions(df []byte) []string {
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(df))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var cur strings.Builder
	var heredocs []string // terminators still to skip
	var strip []bool
	for sc.Scan() {
		line := sc.Text()
		if len(heredocs) > 0 {
			t := line
			if strip[0] {
				t = strings.TrimLeft(t, "\t")
			}
			if t == heredocs[0] {
				heredocs, strip = heredocs[1:], strip[1:]
			}
			continue
		}
		t := strings.TrimSpace(line)
		if cur.Len() == 0 && (t == "" || strings.HasPrefix(t, "#")) {
			continue
		}
		if cur.Len() > 0 && strings.HasPrefix(t, "#") {
			continue // comments inside a continued instruction
		}
		if s, ok := strings.CutSuffix(t, "\\"); ok {
			cur.WriteString(s)
			cur.WriteByte(' ')
			continue
		}
		cur.WriteString(t)
		ins := cur.String()
		cur.Reset()
		out = append(out, ins)
		w := strings.Fields(ins)
		if len(w) > 0 && !strings.EqualFold(w[0], "FROM") && !strings.EqualFold(w[0], "ARG") {
			for _, m := range heredocRe.FindAllStringSubmatch(ins, -1) {
				if m[2] != m[4] {
					continue
				}
				heredocs = append(heredocs, m[3])
				strip = append(strip, m[1] == "-")
			}
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}

func unquote(s string) string {
	if len(s) >= 2 && (s[0] == '"' && s[len(s)-1] == '"' || s[0] == '\'' && s[len(s)-1] == '\'') {
		return s[1 : len(s)-1]
	}
	return s
}

var varRe = regexp.MustCompile(`\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))`)

// expand substitutes $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
// ${VAR:+alt} and ${VAR+alt} from vars.
func expand(s string, vars map[string]string) string {
	return varRe.ReplaceAllStringFunc(s, func(m string) string {
		sm := varRe.FindStringSubmatch(m)
		name := sm[1]
		if name == "" {
			return vars[sm[4]]
		}
		v, set := vars[name]
		switch sm[2] {
		case ":-":
			if v == "" {
				return sm[3]
			}
		case "-":
			if !set {
				return sm[3]
			}
		case ":+":
			if v != "" {
				return sm[3]
			}
			return ""
		case "+":
			if set {
				return sm[3]
			}
			return ""
		}
		return v
	})
}
