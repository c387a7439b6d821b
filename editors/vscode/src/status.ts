/**
 * What the status bar says, from the server's `difill/status` answer (or a failure to get one).
 * No `vscode` import: tested under plain Node.
 */

export type StatusKind = 'starting' | 'loading' | 'ready' | 'error' | 'stopped' | 'disabled';

export interface StatusView {
  kind: StatusKind;
  /** Status bar text, with a codicon. */
  text: string;
  tooltip: string;
}

interface ModelStatus {
  state?: unknown;
  message?: unknown;
  name?: unknown;
  parameters?: unknown;
  backend?: unknown;
  device?: unknown;
  loadMs?: unknown;
}

const LOADING_STATES = new Set(['loading', 'starting', 'pending', 'idle', 'unloaded']);
const ERROR_STATES = new Set(['error', 'failed']);

/** The view for a `difill/status` result. */
export function describeStatus(result: unknown): StatusView {
  const model = (typeof result === 'object' && result !== null ? (result as { model?: ModelStatus }).model : undefined) ?? {};
  const state = typeof model.state === 'string' ? model.state : 'unknown';
  const message = typeof model.message === 'string' ? model.message : '';
  if (ERROR_STATES.has(state)) {
    return { kind: 'error', text: '$(error) difill', tooltip: `difill: the model did not load: ${message || state}` };
  }
  if (state === 'ready') {
    const parts = [model.name, model.backend, model.device].filter((x) => typeof x === 'string');
    const params = typeof model.parameters === 'number' ? ` ${(model.parameters / 1e6).toFixed(1)}M parameters` : '';
    const load = typeof model.loadMs === 'number' ? `, loaded in ${(model.loadMs / 1000).toFixed(1)} s` : '';
    return { kind: 'ready', text: '$(sparkle) difill', tooltip: `difill: ${parts.join(', ')}${params}${load}` };
  }
  if (LOADING_STATES.has(state)) {
    return { kind: 'loading', text: '$(loading~spin) difill', tooltip: `difill: loading the model${message ? `: ${message}` : ''}` };
  }
  return { kind: 'loading', text: '$(loading~spin) difill', tooltip: `difill: ${state}${message ? `: ${message}` : ''}` };
}

/** The view when the server is not running or could not be asked. */
export function describeProblem(kind: 'starting' | 'stopped' | 'disabled' | 'error', message = ''): StatusView {
  switch (kind) {
    case 'starting':
      return { kind, text: '$(loading~spin) difill', tooltip: 'difill: starting the server' };
    case 'disabled':
      return { kind, text: '$(circle-slash) difill', tooltip: 'difill: disabled (difill.enable)' };
    case 'stopped':
      return { kind, text: '$(debug-disconnect) difill', tooltip: `difill: server stopped${message ? `: ${message}` : ''}` };
    default:
      return { kind, text: '$(error) difill', tooltip: `difill: ${message}` };
  }
}
