// Smoke test of the Go client generated from build/openapi.yaml (openapi-generator, -g go) against a live
// server: list runs, run details, signal, updates, and the SSE stream.
//
// `make clients` copies this file into the generated module (build/clients/go/cmd/smoke) and builds it.
// Environment: BASE_URL (ends with /api/v1), API_TOKEN, SMOKE_WORKFLOW_ID / SMOKE_RUN_ID (an open
// AgentConversation run: the signal target), optionally SMOKE_CLOSED_WORKFLOW_ID / SMOKE_CLOSED_RUN_ID.
// Prints one `ok ...` line per step and `SMOKE OK go` at the end; any failure exits 1.
//
// The generated StreamWorkflowRunUpdates decodes the whole text/event-stream body as one RunUpdateEvent
// (OpenAPI 3.1 gives SSE no semantics), so the stream is read by hand below and each `data`
// is decoded into the generated RunUpdate / StreamControl models.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	workflowruns "example.invalid/workflow-runs/client-go"
)

// sseEvent is one dispatched Server-Sent Event, as the WHATWG EventSource algorithm builds it.
type sseEvent struct {
	Event, Data, ID string
	Retry           int
}

// readSSE is a minimal SSE parser: `:` starts a comment (heartbeats), a blank line dispatches the
// event, the last `id` persists across events. It stops when yield returns false or the body ends.
func readSSE(body io.Reader, yield func(sseEvent) bool) error {
	scanner := bufio.NewScanner(body)
	scanner.Buffer(make([]byte, 64*1024), 4*1024*1024)
	var lastID, event string
	var data []string
	retry, sawField := 0, false
	for scanner.Scan() {
		line := strings.TrimSuffix(scanner.Text(), "\r")
		if line == "" {
			if sawField && len(data) > 0 {
				name := event
				if name == "" {
					name = "message"
				}
				if !yield(sseEvent{Event: name, Data: strings.Join(data, "\n"), ID: lastID, Retry: retry}) {
					return nil
				}
			}
			event, data, sawField = "", nil, false // retry persists, as in EventSource
			continue
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		sawField = true
		switch field {
		case "data":
			data = append(data, value)
		case "event":
			event = value
		case "id":
			if !strings.ContainsRune(value, 0) {
				lastID = value
			}
		case "retry":
			if n, err := strconv.Atoi(value); err == nil {
				retry = n
			}
		}
	}
	return scanner.Err()
}

type smoke struct {
	api     *workflowruns.APIClient
	ctx     context.Context
	baseURL string
	token   string
}

func env(name string) string {
	value := os.Getenv(name)
	if value == "" {
		fail(fmt.Errorf("%s is not set", name))
	}
	return value
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "SMOKE FAILED go: %v\n", err)
	os.Exit(1)
}

func check(ok bool, format string, args ...any) {
	if !ok {
		fail(fmt.Errorf("check failed: "+format, args...))
	}
}

// apiError describes a generated-client error with the status and the documented Error body when there is one.
func apiError(operation string, resp *http.Response, err error) error {
	var openAPIErr *workflowruns.GenericOpenAPIError
	if errors.As(err, &openAPIErr) {
		if model, ok := openAPIErr.Model().(workflowruns.Error); ok {
			return fmt.Errorf("%s: %d %s", operation, model.Status, model.Message)
		}
	}
	if resp != nil {
		return fmt.Errorf("%s: HTTP %d: %w", operation, resp.StatusCode, err)
	}
	return fmt.Errorf("%s: %w", operation, err)
}

// waitFor polls probe until it reports done (services are eventually consistent), failing after 30 s.
func waitFor(what string, probe func() bool) {
	deadline := time.Now().Add(30 * time.Second)
	for !probe() {
		if time.Now().After(deadline) {
			fail(fmt.Errorf("timed out waiting for %s", what))
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func (s *smoke) listRuns(runID string) {
	var count int
	waitFor("the run in listWorkflowRuns", func() bool {
		page, resp, err := s.api.RunsAPI.ListWorkflowRuns(s.ctx).
			ListRunsRequest(workflowruns.ListRunsRequest{PageSize: workflowruns.PtrInt32(200)}).Execute()
		if err != nil {
			fail(apiError("listWorkflowRuns", resp, err))
		}
		count = len(page.Runs)
		for _, run := range page.Runs {
			if run.RunId == runID {
				return true
			}
		}
		return false
	})
	fmt.Printf("ok listWorkflowRuns: %d runs, including %s\n", count, runID)
}

func (s *smoke) runDetails(workflowID, runID string) {
	run, resp, err := s.api.RunsAPI.GetWorkflowRun(s.ctx, workflowID, runID).Execute()
	if err != nil {
		fail(apiError("getWorkflowRun", resp, err))
	}
	check(run.RunId == runID && run.WorkflowId == workflowID, "details are the run's")
	check(run.Status == workflowruns.WORKFLOWRUNSTATUS_RUNNING, "the signal target is RUNNING (got %s)", run.Status)
	fmt.Printf("ok getWorkflowRun: %s %s, %d history events\n", run.Type, run.Status, len(run.History))

	_, resp, err = s.api.RunsAPI.GetWorkflowRun(s.ctx, workflowID, "00000000-0000-4000-8000-000000000000").Execute()
	var openAPIErr *workflowruns.GenericOpenAPIError
	check(err != nil && resp != nil && resp.StatusCode == http.StatusNotFound, "an unknown run answers 404")
	check(errors.As(err, &openAPIErr), "the 404 is a GenericOpenAPIError")
	model, ok := openAPIErr.Model().(workflowruns.Error)
	check(ok && model.Status == http.StatusNotFound, "the 404 body is the Error model")
	fmt.Printf("ok getWorkflowRun (unknown run): 404 %s\n", model.GetErrorCode())
}

func (s *smoke) signalAndReadUpdates(workflowID, runID string) []workflowruns.RunUpdate {
	text := fmt.Sprintf("hello from go %d", time.Now().UnixNano())
	body := workflowruns.NewSignalRequest(text)
	body.AdditionalProperties = map[string]any{"data": map[string]any{"client": "go"}}
	signalled, resp, err := s.api.RunsAPI.SignalWorkflowRun(s.ctx, workflowID, runID, "UserInput").
		SignalRequest(*body).Execute()
	if err != nil {
		fail(apiError("signalWorkflowRun", resp, err))
	}
	check(signalled.Status == "success", "signal status is success")
	fmt.Printf("ok signalWorkflowRun: %s\n", signalled.Message)

	var updates []workflowruns.RunUpdate
	waitFor("the answer to the signal", func() bool {
		list, resp, err := s.api.UpdatesAPI.GetWorkflowRunUpdates(s.ctx, workflowID, runID).Since(0).Execute()
		if err != nil {
			fail(apiError("getWorkflowRunUpdates", resp, err))
		}
		updates = list.Messages
		for _, update := range updates {
			if update.Type == "ANSWER" && strings.Contains(update.Message, text) {
				return true
			}
		}
		return false
	})
	last := updates[len(updates)-1]
	fmt.Printf("ok getWorkflowRunUpdates: %d updates, the last: %s at %d ms\n", len(updates), last.Type, last.Timestamp)
	return updates
}

// openStream GETs the stream by hand (same base URL and bearer token as the generated client).
func (s *smoke) openStream(ctx context.Context, workflowID, runID, query string) *http.Response {
	target := fmt.Sprintf("%s/workflows/runs/%s/%s/stream%s", s.baseURL, url.PathEscape(workflowID), url.PathEscape(runID), query)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		fail(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.token)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fail(fmt.Errorf("streamWorkflowRunUpdates: %w", err))
	}
	check(resp.StatusCode == http.StatusOK, "stream answers 200 (got %d)", resp.StatusCode)
	check(strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream"), "stream content type")
	return resp
}

func decodeUpdate(data, runID string) workflowruns.RunUpdate {
	var update workflowruns.RunUpdate
	if err := json.Unmarshal([]byte(data), &update); err != nil {
		fail(fmt.Errorf("update event data is not a RunUpdate: %w", err))
	}
	check(update.WorkflowRunId == runID, "update.workflow_run_id is the run's id")
	return update
}

func (s *smoke) streamOpenRun(workflowID, runID string, stored []workflowruns.RunUpdate) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp := s.openStream(ctx, workflowID, runID, "?since=0")
	defer resp.Body.Close()
	var received []workflowruns.RunUpdate
	firstRetry, lastID := 0, ""
	err := readSSE(resp.Body, func(event sseEvent) bool {
		if firstRetry == 0 {
			firstRetry = event.Retry
		}
		check(event.Event == "message", "only update events while the run is open (got %s)", event.Event)
		received = append(received, decodeUpdate(event.Data, runID))
		lastID = event.ID
		return len(received) < len(stored)
	})
	if err != nil {
		fail(fmt.Errorf("reading the stream: %w", err))
	}
	check(len(received) == len(stored), "the stream replays the %d stored updates (got %d)", len(stored), len(received))
	for i := range stored {
		check(received[i].Timestamp == stored[i].Timestamp && received[i].Message == stored[i].Message, "update %d matches", i)
	}
	check(firstRetry > 0, "the first frame carries retry")
	fmt.Printf("ok streamWorkflowRunUpdates: retry %d, %d update events, last id %s\n", firstRetry, len(received), lastID)
}

func (s *smoke) streamClosedRun(workflowID, runID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp := s.openStream(ctx, workflowID, runID, "")
	defer resp.Body.Close()
	messages := 0
	var end *workflowruns.StreamControl
	err := readSSE(resp.Body, func(event sseEvent) bool {
		switch event.Event {
		case "message":
			decodeUpdate(event.Data, runID)
			messages++
		case "end":
			end = &workflowruns.StreamControl{}
			if err := json.Unmarshal([]byte(event.Data), end); err != nil {
				fail(fmt.Errorf("end event data is not a StreamControl: %w", err))
			}
		}
		return true
	})
	if err != nil {
		fail(fmt.Errorf("reading the stream: %w", err))
	}
	check(end != nil && end.Reason == workflowruns.STREAMCONTROLREASON_RUN_CLOSED, "the stream ends with an end event")
	check(end.Status != nil && *end.Status != workflowruns.WORKFLOWRUNSTATUS_RUNNING, "the end event carries the final status")
	fmt.Printf("ok streamWorkflowRunUpdates (closed run): %d update events, end %s %s\n", messages, end.Reason, *end.Status)
}

func main() {
	baseURL := strings.TrimRight(env("BASE_URL"), "/")
	token := env("API_TOKEN")
	workflowID, runID := env("SMOKE_WORKFLOW_ID"), env("SMOKE_RUN_ID")

	cfg := workflowruns.NewConfiguration()
	cfg.Servers = workflowruns.ServerConfigurations{{URL: baseURL}}
	cfg.HTTPClient = &http.Client{Timeout: 30 * time.Second}
	s := &smoke{
		api:     workflowruns.NewAPIClient(cfg),
		ctx:     context.WithValue(context.Background(), workflowruns.ContextAccessToken, token),
		baseURL: baseURL,
		token:   token,
	}

	s.listRuns(runID)
	s.runDetails(workflowID, runID)
	updates := s.signalAndReadUpdates(workflowID, runID)
	s.streamOpenRun(workflowID, runID, updates)
	if closedWorkflowID, closedRunID := os.Getenv("SMOKE_CLOSED_WORKFLOW_ID"), os.Getenv("SMOKE_CLOSED_RUN_ID"); closedWorkflowID != "" && closedRunID != "" {
		s.streamClosedRun(closedWorkflowID, closedRunID)
	}
	fmt.Println("SMOKE OK go")
}
