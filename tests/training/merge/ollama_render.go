// Render an Ollama chat TEMPLATE the way Ollama does, for tests/training/merge/test_modelfile.py.
//
// Reads {"template": "...", "messages": [{"role": ..., "content": ...}]} on stdin and writes the
// rendered prompt. It follows ollama/ollama template/template.go (commit aac17d5f): the template is
// parsed with text/template/parse in SkipFuncCheck mode and executed with missingkey=zero on
// {System, Messages, Tools, Response: ""}, where consecutive messages of one role are joined with a
// blank line and System is every system message joined the same way. Only the standard library.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail("input", err)
	}
	tree := parse.New("")
	tree.Mode |= parse.SkipFuncCheck
	tree, err := tree.Parse(in.Template, "", "", map[string]*parse.Tree{})
	if err != nil {
		fail("parse", err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").AddParseTree("", tree)
	if err != nil {
		fail("template", err)
	}
	var system []string
	var messages []*message
	for i := range in.Messages {
		m := in.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(messages); n > 0 && messages[n-1].Role == m.Role {
			messages[n-1].Content += "\n\n" + m.Content
		} else {
			messages = append(messages, &m)
		}
	}
	data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": messages, "Tools": nil, "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fail("execute", err)
	}
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}
