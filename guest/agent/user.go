package agent

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Identity is a resolved process identity.
type Identity struct {
	UID, GID uint32
	Groups   []uint32
	Home     string
}

// maxDBSize bounds how much of /etc/passwd or /etc/group is read.
const maxDBSize = 4 << 20

// resolveUser resolves "user[:group]" (names or numbers) against the
// image's passwd and group databases, as Docker does: a numeric uid that
// has no passwd entry is used as is with gid 0.
func resolveUser(spec, passwdPath, groupPath string) (Identity, error) {
	if spec == "" {
		spec = "0"
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" || (hasGroup && groupPart == "") {
		return Identity{}, fmt.Errorf("user %q: want user[:group]", spec)
	}
	users := readDB(passwdPath)
	groups := readDB(groupPath)
	id := Identity{Home: "/"}
	found := false
	for _, u := range users {
		if len(u) < 7 {
			continue
		}
		if u[0] == userPart || u[2] == userPart {
			uid, err1 := parseID(u[2])
			gid, err2 := parseID(u[3])
			if err1 != nil || err2 != nil {
				continue
			}
			id.UID, id.GID, id.Home = uid, gid, u[5]
			found = true
			break
		}
	}
	if !found {
		uid, err := parseID(userPart)
		if err != nil {
			return Identity{}, fmt.Errorf("user %q: no such user in /etc/passwd", userPart)
		}
		id.UID, id.GID = uid, 0
	}
	if hasGroup {
		gid, ok := lookupGroup(groups, groupPart)
		if !ok {
			return Identity{}, fmt.Errorf("group %q: no such group in /etc/group", groupPart)
		}
		id.GID = gid
	} else if found {
		name := userPart
		for _, u := range users {
			if len(u) >= 7 && u[2] == userPart {
				name = u[0]
			}
		}
		for _, g := range groups {
			if len(g) < 4 {
				continue
			}
			gid, err := parseID(g[2])
			if err != nil || gid == id.GID {
				continue
			}
			for _, m := range strings.Split(g[3], ",") {
				if m == name {
					id.Groups = append(id.Groups, gid)
					break
				}
			}
		}
	}
	if id.Home == "" {
		id.Home = "/"
	}
	return id, nil
}

func lookupGroup(groups [][]string, spec string) (uint32, bool) {
	for _, g := range groups {
		if len(g) >= 3 && (g[0] == spec || g[2] == spec) {
			if gid, err := parseID(g[2]); err == nil {
				return gid, true
			}
		}
	}
	gid, err := parseID(spec)
	return gid, err == nil
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, err
	}
	return uint32(n), nil
}

func readDB(path string) [][]string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	return parseDB(io.LimitReader(f, maxDBSize))
}

// parseDB splits a colon-separated database (passwd, group), skipping
// comments and blank lines.
func parseDB(r io.Reader) [][]string {
	var out [][]string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out
}
