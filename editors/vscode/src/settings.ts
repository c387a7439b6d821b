/**
 * The extension's settings (`difill.*` in VS Code) and the server's view of them.
 *
 * This module must not import `vscode`: the unit tests run it under plain Node. VS Code's
 * names are the ones users see in the Settings UI; `serverSettings` maps them onto the
 * server's keys (docs/protocol.md), which differ in two places: `modelPath` is the server's
 * `model` and `syntaxConstraint` is its `constrainSyntax`.
 */

export type Backend = 'torch' | 'onnx';
export type Device = 'cpu' | 'cuda';
export type Dtype = 'float32' | 'bfloat16' | 'float16' | 'int8';
export type Mode = 'auto' | 'line' | 'block';

export interface DifillConfiguration {
  /** Offer inline suggestions at all. */
  enable: boolean;
  /** The difill executable (or a python that runs `-m difill`, with serverArgs). */
  serverPath: string;
  /** Arguments before the global options; the default runs the language server over stdio. */
  serverArgs: string[];
  /** Model directory; null: the model bundled with difill. */
  modelPath: string | null;
  backend: Backend;
  device: Device;
  /** Weights of the torch backend; null: bfloat16 on CUDA, float16 weights (float32 arithmetic) on the CPU. */
  dtype: Dtype | null;
  /** Fixed number of denoising steps; null: stop on the confidence threshold. */
  steps: number | null;
  /** Largest completion in tokens; null: the server's default for the mode. */
  maxTokens: number | null;
  mode: Mode;
  /** Suggestions per request (Alt+] / Alt+[ cycle through them). */
  candidates: number;
  /** Fixed delay before an automatic suggestion, in ms; null: adaptive. */
  debounceMs: number | null;
  /** Language ids to complete; ["*"] for all. */
  languages: string[];
  /** Keep suggestions syntactically valid with tree-sitter. */
  syntaxConstraint: boolean;
  /** The server's log level. */
  logLevel: 'DEBUG' | 'INFO' | 'WARNING' | 'ERROR';
  /** Also write the server's log to this file; empty: only the output channel. */
  logFile: string;
}

/** Languages with a tree-sitter grammar in difill; keep in step with package.json. */
export const DEFAULT_LANGUAGES: readonly string[] = [
  'python', 'javascript', 'javascriptreact', 'typescript', 'typescriptreact', 'go', 'rust', 'java', 'c', 'cpp',
];

/** The defaults; package.json's contributes.configuration declares the same (a test checks). */
export const DEFAULTS: Readonly<DifillConfiguration> = Object.freeze({
  enable: true,
  serverPath: 'difill',
  serverArgs: ['serve'],
  modelPath: null,
  backend: 'torch',
  device: 'cpu',
  dtype: null,
  steps: null,
  maxTokens: null,
  mode: 'auto',
  candidates: 1,
  debounceMs: null,
  languages: [...DEFAULT_LANGUAGES],
  syntaxConstraint: true,
  logLevel: 'WARNING',
  logFile: '',
});

/** The keys the server reads from initializationOptions and workspace/didChangeConfiguration. */
export interface ServerSettings {
  model: string | null;
  backend: Backend;
  device: Device;
  dtype: Dtype | null;
  steps: number | null;
  maxTokens: number | null;
  mode: Mode;
  candidates: number;
  constrainSyntax: boolean;
  languages: string[] | null;
  adaptiveDebounce: boolean;
  debounceMs?: number;
}

type Check = (value: unknown) => boolean;

const isString: Check = (v) => typeof v === 'string';
const isBoolean: Check = (v) => typeof v === 'boolean';
const isIntIn = (low: number, high: number): Check => (v) =>
  typeof v === 'number' && Number.isInteger(v) && v >= low && v <= high;
const orNull = (check: Check): Check => (v) => v === null || check(v);
const oneOf = (...choices: string[]): Check => (v) => typeof v === 'string' && choices.includes(v);
const isStringList: Check = (v) => Array.isArray(v) && v.every((x) => typeof x === 'string');

const CHECKS: { [K in keyof DifillConfiguration]: [Check, string] } = {
  enable: [isBoolean, 'true or false'],
  serverPath: [(v) => isString(v) && (v as string).trim() !== '', 'a non-empty path'],
  serverArgs: [isStringList, 'a list of strings'],
  modelPath: [orNull(isString), 'a path or null'],
  backend: [oneOf('torch', 'onnx'), '"torch" or "onnx"'],
  device: [oneOf('cpu', 'cuda'), '"cpu" or "cuda"'],
  dtype: [orNull(oneOf('float32', 'bfloat16', 'float16', 'int8')), 'null, "float32", "bfloat16", "float16" or "int8"'],
  steps: [orNull(isIntIn(1, 1024)), 'null or an integer from 1 to 1024'],
  maxTokens: [orNull(isIntIn(1, 1024)), 'null or an integer from 1 to 1024'],
  mode: [oneOf('auto', 'line', 'block'), '"auto", "line" or "block"'],
  candidates: [isIntIn(1, 8), 'an integer from 1 to 8'],
  debounceMs: [orNull(isIntIn(0, 5000)), 'null or an integer from 0 to 5000'],
  languages: [isStringList, 'a list of language ids'],
  syntaxConstraint: [isBoolean, 'true or false'],
  logLevel: [oneOf('DEBUG', 'INFO', 'WARNING', 'ERROR'), '"DEBUG", "INFO", "WARNING" or "ERROR"'],
  logFile: [isString, 'a path or ""'],
};

export interface ReadResult {
  config: DifillConfiguration;
  /** One message per setting that had a bad value and fell back to its default. */
  warnings: string[];
}

/**
 * Read every setting through `get` (VS Code's `workspace.getConfiguration('difill').get`).
 * A bad value falls back to the default with a warning instead of failing: a typo in
 * settings.json must not take completion down.
 */
export function readConfiguration(get: (key: string) => unknown): ReadResult {
  const config = { ...DEFAULTS, languages: [...DEFAULTS.languages], serverArgs: [...DEFAULTS.serverArgs] } as
    DifillConfiguration;
  const warnings: string[] = [];
  for (const key of Object.keys(CHECKS) as (keyof DifillConfiguration)[]) {
    let value = get(key);
    if (value === undefined) {
      continue;
    }
    if (key === 'modelPath' && value === '') {
      value = null; // the Settings UI cannot write null into a string box
    }
    const [check, expected] = CHECKS[key];
    if (!check(value)) {
      warnings.push(`difill.${key} must be ${expected}, not ${JSON.stringify(value)}: using the default`);
      continue;
    }
    (config as unknown as Record<string, unknown>)[key] = Array.isArray(value) ? [...value] : value;
  }
  return { config, warnings };
}

/** The server's settings for `config`: initializationOptions, and the `difill` section sent on change. */
export function serverSettings(config: DifillConfiguration): ServerSettings {
  const settings: ServerSettings = {
    model: config.modelPath,
    backend: config.backend,
    device: config.device,
    dtype: config.dtype,
    steps: config.steps,
    maxTokens: config.maxTokens,
    mode: config.mode,
    candidates: config.candidates,
    constrainSyntax: config.syntaxConstraint,
    languages: config.languages.includes('*') ? null : [...config.languages],
    adaptiveDebounce: config.debounceMs === null,
  };
  if (config.debounceMs !== null) {
    settings.debounceMs = config.debounceMs;
  }
  return settings;
}

/** Settings that only take effect when the server (and the document selector) start again. */
const RESTART_KEYS: (keyof DifillConfiguration)[] = ['enable', 'serverPath', 'serverArgs', 'languages', 'logLevel', 'logFile'];

/** Whether going from `before` to `after` needs a server restart, rather than didChangeConfiguration. */
export function needsRestart(before: DifillConfiguration, after: DifillConfiguration): boolean {
  return RESTART_KEYS.some((key) => JSON.stringify(before[key]) !== JSON.stringify(after[key]));
}
