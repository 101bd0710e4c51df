-- tests/pipewire/wireplumber-0.4/vsnd.lua — the components WirePlumber 0.4
-- loads for the private test daemon: permissions, default nodes (not
-- persisted), and the standard linking policy. Nothing is restored from or
-- saved to disk, so every run starts with volumes at 1.0 and no remembered
-- stream targets.
components = {}

function load_module(m, a)
  components[m] = { "libwireplumber-module-" .. m, type = "module", args = a }
end

function load_script(s, a)
  components[s] = { s, type = "script/lua", args = a }
end

local policy = {
  ["move"] = true,
  ["follow"] = true,
  ["filter.forward-format"] = false,
  ["audio.no-dsp"] = false,
  ["duck.level"] = 0.3,
}

load_module("metadata")
load_script("access/access-default.lua", { rules = {} })
load_module("default-nodes", { ["use-persistent-storage"] = false })
load_module("si-node")
load_module("si-audio-adapter")
load_module("si-standard-link")
load_module("si-audio-endpoint")
load_module("default-nodes-api")
load_module("mixer-api")
load_script("create-item.lua", policy)
load_script("policy-node.lua", policy)
