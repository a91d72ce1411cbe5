// Adapter files on disk, against files written by tests/reference/generate_peft_files.py and
// generate_adapter_files.py from PyTorch tensors with the published layouts (tests/reference/peft/<case>/):
//
// - PEFT LoRA (io/peft.hpp): loading gives PEFT's per-module rank, alpha and scaling (rank_pattern /
//   alpha_pattern, rsLoRA, list and regex target_modules) and the ΔW PyTorch computes with PEFT's
//   get_delta_weight;
// - GLoRA (io/glora_file.hpp): the PEFT-style GLoRA code's keys; loading gives the merged layer
//   (W_eff, b_eff) PyTorch computes for each layer's eval_config;
// - FLoRA (io/flora_file.hpp): the official code's param_G / param_n in its (in, out, k…) order; loading
//   gives the official ΔW;
//
// and for all three, saving writes files that load back bit for bit (and, under ctest, that the
// generators' --check reads with the format's conventions), and malformed adapters raise
// io::format_error naming the file, the module and the tensor.
//
// The hidden test case [.merge_adapter_output] checks a file examples/merge_adapter wrote (path in
// TA_MERGED_FILE, adapter case in TA_MERGED_CASE) against PyTorch's merged weights; ctest runs it after
// the tool.
#include "reference.hpp"

#include <tensor_adapters/io/flora_file.hpp>
#include <tensor_adapters/io/glora_file.hpp>
#include <tensor_adapters/io/peft.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

namespace ta = tensor_adapters;
namespace io = tensor_adapters::io;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

const std::string peft_dir = std::string(TA_REFERENCE_DIR) + "/peft/";

struct case_info {
  const char* name;
  io::dtype stored;
  std::size_t modules;
};
const case_info cases[] = {{"lora_f32", io::dtype::F32, 8},
                           {"lora_f16", io::dtype::F16, 8},
                           {"lora_bf16", io::dtype::BF16, 8},
                           {"lora_f64_rslora", io::dtype::F64, 3}};

// ΔW of a loaded layer as a flat row-major vector.
template <class T>
std::vector<T> delta(const io::peft_lora_layer<T>& layer) {
  const ta::tensor<T, 2> dw = ta::delta_weight(layer.adapter);
  return std::vector<T>(dw.data(), dw.data() + dw.size());
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// A scratch copy of a reference adapter directory, to be broken by a test.
std::string scratch_copy(const std::string& case_name, const std::string& tag) {
  const fs::path dir = fs::path("peft_scratch") / tag;
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(peft_dir + case_name + "/" + f, dir / f);
  return dir.string();
}

// Rewrites a scratch adapter's tensor file, keeping every tensor `keep` accepts and adding `extra`.
template <class Keep, class Extra>
void rewrite_tensors(const std::string& dir, Keep keep, Extra extra) {
  const std::string path = dir + "/adapter_model.safetensors";
  const io::safetensors_file f = io::read_safetensors(path);
  io::safetensors_writer w;
  for (const auto& t : f.tensors())
    if (keep(t)) w.add_raw(t.name, t.type, t.shape, f.raw(t), static_cast<std::size_t>(t.end - t.begin));
  extra(w);
  w.write(path);
}

void require_load_error(const std::string& dir, const std::vector<std::string>& fragments) {
  try {
    io::load_peft_lora<double>(dir);
    FAIL("the adapter was accepted");
  } catch (const io::format_error& e) {
    const std::string what = e.what();
    for (const auto& f : fragments) CHECK_THAT(what, Contains(f));
  }
}

// A reference record of rank 1, 2 or 4 as a flat vector (and its shape, if asked).
std::vector<double> flat(const reference::file& ref, const std::string& key, std::size_t rank,
                         std::vector<ta::index>* shape = nullptr) {
  auto values = [&](const auto& t) {
    if (shape) shape->assign(t.dimensions().begin(), t.dimensions().end());
    std::vector<double> v(static_cast<std::size_t>(t.size()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = t.data()[i];
    return v;
  };
  if (rank == 1) return values(ref.get<double, 1>(key));
  if (rank == 2) return values(ref.get<double, 2>(key));
  REQUIRE(rank == 4);
  return values(ref.get<double, 4>(key));
}

}  // namespace

TEMPLATE_TEST_CASE("PEFT adapters written from PyTorch load with PEFT's ranks, scales and delta weights", "[peft]",
                   float, double) {
  using T = TestType;
  const reference::file ref("peft_lora.txt");
  for (const case_info& c : cases) {
    INFO("case " << c.name);
    const io::peft_lora_adapter<T> a = io::load_peft_lora<T>(peft_dir + c.name);
    REQUIRE(a.layers.size() == c.modules);
    for (const auto& [module, layer] : a.layers) {
      INFO("module " << module);
      const std::string key = std::string(c.name) + "/" + module + "/";
      REQUIRE(ref.has(key + "delta_weight"));
      CHECK(ta::rank(layer.adapter) == static_cast<ta::index>(ref.scalar(key + "rank")));
      CHECK(io::peft_rank(a.config, module) == static_cast<ta::index>(ref.scalar(key + "rank")));
      CHECK(io::peft_alpha(a.config, module) == ref.scalar(key + "alpha"));
      CHECK(static_cast<double>(layer.adapter.scale) ==
            Approx(ref.scalar(key + "scaling")).epsilon(4 * std::numeric_limits<T>::epsilon()));
      std::vector<ta::index> shape;
      const std::vector<double> want = flat(ref, key + "delta_weight", layer.weight_shape.size(), &shape);
      CHECK(layer.weight_shape == shape);
      const std::vector<T> got = delta(layer);
      REQUIRE(got.size() == want.size());
      double scale = 0;
      for (double v : want) scale = std::max(scale, std::abs(v));
      const double tol = 8 * std::numeric_limits<T>::epsilon() * static_cast<double>(ta::rank(layer.adapter)) * scale;
      for (std::size_t i = 0; i < want.size(); ++i) REQUIRE(std::abs(static_cast<double>(got[i]) - want[i]) <= tol);
    }
  }
}

TEST_CASE("PEFT pattern and target rules", "[peft]") {
  CHECK(io::peft_pattern_matches("v_proj", "model.layers.0.self_attn.v_proj"));
  CHECK(io::peft_pattern_matches("v_proj", "v_proj"));
  CHECK_FALSE(io::peft_pattern_matches("proj", "model.v_proj"));      // only whole name components
  CHECK_FALSE(io::peft_pattern_matches("v_proj", "model.v_proj.x"));  // anchored at the end
  CHECK(io::peft_pattern_matches("layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"));
  CHECK_FALSE(io::peft_pattern_matches("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"));
  CHECK(io::peft_pattern_matches("layers\\.[0-3]\\..*_proj", "model.layers.2.mlp.up_proj"));  // a regex key

  io::peft_lora_config c;
  CHECK(io::peft_targets(c, "anything"));  // no target_modules: every module
  c.r = 8;
  c.lora_alpha = 16;
  c.rank_pattern = {{"q_proj", 4}, {"layers.0.self_attn.q_proj", 2}};
  c.alpha_pattern = {{"layers.0.self_attn.q_proj", 3.0}};
  CHECK(io::peft_rank(c, "model.layers.0.self_attn.q_proj") == 4);  // the first matching key wins
  CHECK(io::peft_alpha(c, "model.layers.0.self_attn.q_proj") == 3.0);
  CHECK(io::peft_rank(c, "model.layers.0.self_attn.k_proj") == 8);
  CHECK(io::peft_scale(c, "model.layers.0.self_attn.q_proj") == 0.75);
  c.use_rslora = true;
  CHECK(io::peft_scale(c, "model.layers.0.self_attn.k_proj") == Approx(16.0 / std::sqrt(8.0)));

  c.target_modules = {"q_proj", "model.conv1"};
  CHECK(io::peft_targets(c, "model.layers.0.self_attn.q_proj"));
  CHECK(io::peft_targets(c, "model.conv1"));
  CHECK_FALSE(io::peft_targets(c, "model.conv10"));
  CHECK_FALSE(io::peft_targets(c, "model.layers.0.self_attn.qq_proj"));
  c.target_modules_regex = ".*\\.(q|v)_proj";
  CHECK(io::peft_targets(c, "model.layers.0.self_attn.v_proj"));
  CHECK_FALSE(io::peft_targets(c, "model.conv1"));
  CHECK_FALSE(io::peft_targets(c, "v_proj"));  // the regex must match the whole name
  // An empty list selects nothing in PEFT, which refuses it; it is not the absent list (every module).
  CHECK_THROWS_WITH(io::parse_peft_lora_config(R"({"r": 8, "lora_alpha": 8, "target_modules": []})", "empty"),
                    Contains("empty") && Contains("target_modules") && Contains("empty list"));
  CHECK(io::peft_targets(io::parse_peft_lora_config(R"({"r": 8, "lora_alpha": 8, "target_modules": null})", "null"),
                         "anything"));

  // PEFT's narrowing of a list: layers_to_transform (with or without layers_pattern) and exclude_modules.
  io::peft_lora_config n = io::parse_peft_lora_config(
      R"({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "model.layers.1.mlp.up_proj"],
          "layers_to_transform": [0, 2], "layers_pattern": "layers",
          "exclude_modules": ["model.layers.2.self_attn.v_proj"]})", "narrowed");
  CHECK(n.layers_to_transform == std::vector<ta::index>{0, 2});
  CHECK(io::peft_targets(n, "model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(io::peft_targets(n, "model.layers.1.self_attn.q_proj"));  // layer 1 is not transformed
  CHECK(io::peft_targets(n, "model.layers.2.self_attn.q_proj"));
  CHECK_FALSE(io::peft_targets(n, "model.layers.2.self_attn.v_proj"));  // excluded
  CHECK(io::peft_targets(n, "model.layers.1.mlp.up_proj"));  // named in full: no layer rule
  CHECK_FALSE(io::peft_targets(n, "model.blocks.0.self_attn.q_proj"));  // no "layers" list in the name
  n.layers_pattern.clear();  // then any module list's index counts
  CHECK(io::peft_targets(n, "model.blocks.0.self_attn.q_proj"));
  CHECK(io::peft_targets(n, "q_proj"));              // named in full
  CHECK_FALSE(io::peft_targets(n, "attn.q_proj"));  // a suffix, but no layer index
  // What the config writes, it reads back.
  const io::peft_lora_config back = io::parse_peft_lora_config(io::peft_lora_config_json(n), "written");
  CHECK(back.layers_to_transform == n.layers_to_transform);
  CHECK(back.exclude_modules == n.exclude_modules);
  CHECK(back.layers_pattern.empty());
  const io::peft_lora_config one = io::parse_peft_lora_config(
      R"({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": 1,
          "exclude_modules": ".*layers\\.3\\..*"})", "one");
  CHECK(io::peft_targets(one, "model.layers.1.self_attn.q_proj"));
  CHECK_FALSE(io::peft_targets(one, "model.layers.0.self_attn.q_proj"));
  CHECK(one.layers_to_transform == std::vector<ta::index>{1});
  CHECK(io::parse_peft_lora_config(io::peft_lora_config_json(one), "written").exclude_modules_regex ==
        ".*layers\\.3\\..*");
  CHECK_THROWS_WITH(io::parse_peft_lora_config(R"({"r": 8, "lora_alpha": 8, "layers_to_transform": "0"})", "bad"),
                    Contains("layers_to_transform"));
  CHECK_THROWS_WITH(io::parse_peft_lora_config(R"({"r": 8, "lora_alpha": 8, "exclude_modules": 3})", "bad"),
                    Contains("exclude_modules"));
  CHECK_THROWS_WITH(io::parse_peft_lora_config(R"({"r": 8, "lora_alpha": 8, "layers_pattern": ["("]})", "bad"),
                    Contains("regular expression"));
}

TEST_CASE("PEFT adapters saved by the library load back bit for bit", "[peft]") {
  for (const case_info& c : cases) {
    INFO("case " << c.name);
    const io::peft_lora_adapter<double> a = io::load_peft_lora<double>(peft_dir + c.name);
    // Under ctest, generate_peft_files.py --check then reads these with PEFT's conventions.
    const std::string out = std::string("peft_saved/") + c.name;
    fs::remove_all(out);
    io::save_peft_lora(a, out, c.stored);
    const io::safetensors_file original = io::read_safetensors(peft_dir + c.name + "/adapter_model.safetensors");
    const io::safetensors_file saved = io::read_safetensors(out + "/adapter_model.safetensors");
    CHECK(saved.metadata().at("format") == "pt");
    REQUIRE(saved.tensors().size() == original.tensors().size());
    for (const auto& t : original.tensors()) {
      const io::tensor_info& u = saved.info(t.name);
      CHECK(u.type == t.type);
      CHECK(u.shape == t.shape);
      REQUIRE(u.end - u.begin == t.end - t.begin);
      CHECK(std::equal(saved.raw(u), saved.raw(u) + (u.end - u.begin), original.raw(t)));
    }
    const io::peft_lora_adapter<double> b = io::load_peft_lora<double>(out);
    REQUIRE(b.layers.size() == a.layers.size());
    for (const auto& [module, layer] : a.layers) {
      CHECK(b.layers.at(module).adapter.scale == layer.adapter.scale);
      CHECK(b.layers.at(module).weight_shape == layer.weight_shape);
    }
    const std::string json = read_text(out + "/adapter_config.json");
    CHECK_THAT(json, Contains("\"peft_type\": \"LORA\""));
    CHECK_THAT(json, Contains("\"use_rslora\": " + std::string(a.config.use_rslora ? "true" : "false")));
  }
}

TEST_CASE("PEFT adapters built in C++ save with rank and alpha patterns PEFT resolves", "[peft]") {
  std::mt19937_64 gen(11);
  io::peft_lora_adapter<float> a;
  a.config.r = 4;
  a.config.lora_alpha = 8;
  auto q = ta::make_lora<float>(6, 5, {4, 8.0}, gen);
  auto v = ta::make_lora<float>(6, 5, {2, 8.0}, gen);
  auto conv = ta::make_lora<float>(ta::shape<4>{3, 2, 3, 3}, {3, 8.0}, gen);
  for (auto* l : {&q, &v, &conv}) ta::fill_normal(l->B, 0.0, 0.5, gen);
  io::add_peft_lora_layer(a, "model.q_proj", q, {6, 5}, 8.0);
  io::add_peft_lora_layer(a, "model.v_proj", v, {6, 5}, 3.0);
  io::add_peft_lora_layer(a, "model.conv", conv, {3, 2, 3, 3}, 8.0);
  CHECK(a.config.target_modules == std::vector<std::string>{"model.q_proj", "model.v_proj", "model.conv"});
  CHECK(a.config.rank_pattern.size() == 2);
  CHECK(a.config.alpha_pattern.size() == 1);
  CHECK(a.layers.at("model.v_proj").adapter.scale == 1.5f);

  const std::string out = "peft_saved/built_in_cpp";
  fs::remove_all(out);
  io::save_peft_lora(a, out, io::dtype::BF16);
  const io::safetensors_file f = io::read_safetensors(out + "/adapter_model.safetensors");
  CHECK(f.info("base_model.model.model.conv.lora_A.weight").shape == std::vector<ta::index>{3, 2, 3, 3});
  CHECK(f.info("base_model.model.model.conv.lora_B.weight").shape == std::vector<ta::index>{3, 3, 1, 1});
  CHECK(f.info("base_model.model.model.q_proj.lora_B.weight").type == io::dtype::BF16);
  const auto b = io::load_peft_lora<float>(out);
  REQUIRE(b.layers.size() == 3);
  CHECK(b.layers.at("model.v_proj").adapter.scale == 1.5f);
  CHECK(b.layers.at("model.conv").adapter.scale == Approx(8.0f / 3.0f));
  CHECK(ta::rank(b.layers.at("model.conv").adapter) == 3);
  // BF16 rounding of the factors, and nothing else.
  const float a0 = a.layers.at("model.q_proj").adapter.A(1, 2);
  CHECK(b.layers.at("model.q_proj").adapter.A(1, 2) == static_cast<float>(Eigen::bfloat16(a0)));

  // A layer whose scale disagrees with the config is refused before anything is written.
  io::peft_lora_adapter<float> bad = a;
  bad.layers.at("model.q_proj").adapter.scale = 5.0f;
  fs::remove_all("peft_saved/refused");
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("model.q_proj") && Contains("scale"));
  CHECK_FALSE(fs::exists("peft_saved/refused"));
  REQUIRE_THROWS_WITH(io::add_peft_lora_layer(bad, "model.k_proj", q, {6, 4}, 8.0), Contains("model.k_proj"));

  // A rank above min(out, fan_in), which load_peft_lora refuses, is refused when added or saved too.
  ta::lora<float> tall{ta::tensor<float, 2>(5, 4), ta::tensor<float, 2>(4, 5), 1.6f};  // scale 8 / 5
  tall.A.setConstant(0.5f);
  tall.B.setConstant(0.25f);
  const io::peft_lora_config before = a.config;
  REQUIRE_THROWS_WITH(io::add_peft_lora_layer(a, "model.tall", tall, {4, 4}, 8.0),
                      Contains("model.tall") && Contains("above min(out, fan_in) = 4"));
  CHECK(a.layers.count("model.tall") == 0);  // and the config is as it was
  CHECK(a.config.rank_pattern == before.rank_pattern);
  CHECK(a.config.alpha_pattern == before.alpha_pattern);
  CHECK(a.config.target_modules == before.target_modules);
  io::peft_lora_adapter<float> with_tall = a;
  with_tall.config.rank_pattern.insert(with_tall.config.rank_pattern.begin(), {"model.tall", 5});
  with_tall.config.target_modules.push_back("model.tall");
  with_tall.layers["model.tall"] = io::peft_lora_layer<float>{tall, {4, 4}};
  fs::remove_all("peft_saved/refused");
  REQUIRE_THROWS_WITH(io::save_peft_lora(with_tall, "peft_saved/refused"), Contains("above min(out, fan_in)"));
  CHECK_FALSE(fs::exists("peft_saved/refused"));

  // A config without target_modules (every module) that already has layers: adding one keeps them
  // selected, so the adapter still saves.
  io::peft_lora_adapter<float> every;
  every.config.r = 4;
  every.config.lora_alpha = 8;
  every.layers["model.q_proj"] = io::peft_lora_layer<float>{q, {6, 5}};
  io::add_peft_lora_layer(every, "model.k_proj", q, {6, 5}, 8.0);
  CHECK(every.config.target_modules == std::vector<std::string>{"model.q_proj", "model.k_proj"});
  fs::remove_all("peft_saved/every");
  io::save_peft_lora(every, "peft_saved/every");
  CHECK(io::load_peft_lora<float>("peft_saved/every").layers.size() == 2);

  // A module the target_modules regex does not select is refused, the config left as it was.
  io::peft_lora_adapter<float> by_regex;
  by_regex.config.r = 4;
  by_regex.config.lora_alpha = 8;
  by_regex.config.target_modules_regex = ".*q_proj";
  REQUIRE_THROWS_WITH(io::add_peft_lora_layer(by_regex, "model.v_proj", v, {6, 5}, 3.0),
                      Contains("model.v_proj") && Contains("not selected"));
  CHECK(by_regex.config.rank_pattern.empty());
  CHECK(by_regex.config.alpha_pattern.empty());
  CHECK(by_regex.layers.empty());
}

TEST_CASE("PEFT layers added in C++ keep their own rank and alpha, and saves refuse what loads refuse", "[peft]") {
  std::mt19937_64 gen(13);
  auto lin = [&](ta::index out, ta::index in, ta::index r) {
    auto l = ta::make_lora<float>(out, in, {r, 1.0}, gen);
    ta::fill_normal(l.B, 0.0, 0.5, gen);
    return l;
  };
  auto round_trip = [](const io::peft_lora_adapter<float>& a, const std::string& out) {
    fs::remove_all(out);
    io::save_peft_lora(a, out);
    return io::load_peft_lora<float>(out);
  };

  // A layer added again for the same module replaces the first, rank, alpha and scale (the config used to
  // keep both pattern entries, and the file the older one).
  io::peft_lora_adapter<float> a;
  a.config.r = 4;
  a.config.lora_alpha = 8;
  io::add_peft_lora_layer(a, "fc", lin(6, 5, 2), {6, 5}, 4.0);
  io::add_peft_lora_layer(a, "fc", lin(6, 5, 3), {6, 5}, 12.0);
  CHECK(a.config.rank_pattern.size() == 1);
  CHECK(a.config.alpha_pattern.size() == 1);
  CHECK(io::peft_rank(a.config, "fc") == 3);
  auto b = round_trip(a, "peft_saved/readded");
  CHECK(ta::rank(b.layers.at("fc").adapter) == 3);
  CHECK(b.layers.at("fc").adapter.scale == 4.0f);
  io::add_peft_lora_layer(a, "fc", lin(6, 5, 4), {6, 5}, 8.0);  // back to the defaults: no entries left
  CHECK(a.config.rank_pattern.empty());
  CHECK(a.config.alpha_pattern.empty());

  // An added module's key selects that module only: "fc" must not re-rank "head.fc" (PEFT's rule matches a
  // key at any '.'), and names with a regular expression's special characters, which PyTorch allows as
  // ModuleDict keys, select themselves.
  io::peft_lora_adapter<float> c;
  c.config.r = 8;
  c.config.lora_alpha = 8;
  io::add_peft_lora_layer(c, "head.fc", lin(6, 5, 4), {6, 5}, 8.0);
  io::add_peft_lora_layer(c, "fc", lin(6, 5, 2), {6, 5}, 3.0);
  io::add_peft_lora_layer(c, "blocks[0]", lin(6, 5, 3), {6, 5}, 8.0);
  io::add_peft_lora_layer(c, "conv(1x1", lin(6, 5, 5), {6, 5}, 1.5);
  CHECK(io::peft_rank(c.config, "head.fc") == 4);
  CHECK(io::peft_rank(c.config, "fc") == 2);
  CHECK(io::peft_rank(c.config, "blocks[0]") == 3);
  CHECK(io::peft_rank(c.config, "blocks0") == 8);
  CHECK(io::peft_alpha(c.config, "conv(1x1") == 1.5);
  CHECK(io::peft_alpha(c.config, "head.fc") == 8.0);
  const auto d = round_trip(c, "peft_saved/exact_keys");
  REQUIRE(d.layers.size() == 4);
  for (const auto& [module, layer] : c.layers) {
    INFO("module " << module);
    CHECK(ta::rank(d.layers.at(module).adapter) == ta::rank(layer.adapter));
    CHECK(d.layers.at(module).adapter.scale == layer.adapter.scale);
  }

  // A module the config's exclude_modules leaves out cannot be added.
  io::peft_lora_adapter<float> excluding;
  excluding.config.exclude_modules = {"fc"};
  REQUIRE_THROWS_WITH(io::add_peft_lora_layer(excluding, "head.fc", lin(6, 5, 3), {6, 5}, 8.0),
                      Contains("head.fc") && Contains("exclude_modules"));
  CHECK(excluding.layers.empty());
  CHECK(excluding.config.target_modules.empty());

  // A failed add leaves the adapter as it was, its config included.
  io::peft_lora_adapter<float> e;
  e.config.rank_pattern = {{"(unclosed", 2}};
  REQUIRE_THROWS_AS(io::add_peft_lora_layer(e, "fc", lin(6, 5, 3), {6, 5}, 8.0), io::format_error);
  CHECK(e.config.rank_pattern.size() == 1);
  CHECK(e.config.alpha_pattern.empty());
  CHECK(e.config.target_modules.empty());
  CHECK(e.layers.empty());
  // A weight shape whose fan-in overflows (16 · (2^62 + 8) · 4 wraps to 512) does not fit any A.
  REQUIRE_THROWS_WITH(io::add_peft_lora_layer(a, "huge", lin(16, 512, 2), {16, (ta::index(1) << 62) + 8, 4}, 8.0),
                      Contains("huge") && Contains("does not fit"));

  // What load_peft_lora refuses is refused by save, before anything is written: an invalid pattern no
  // layer reaches, a non-finite alpha, r = 0, a non-finite alpha in alpha_pattern.
  fs::remove_all("peft_saved/refused");
  io::peft_lora_adapter<float> bad = c;
  bad.config.rank_pattern.push_back({"(?P<x>v_proj)", 2});
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("regular expression"));
  bad = c;
  bad.config.lora_alpha = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("lora_alpha"));
  bad = c;
  bad.config.r = 0;
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("\"r\""));
  bad = c;
  bad.config.alpha_pattern.push_back({"unused", std::numeric_limits<double>::infinity()});
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("alpha_pattern"));
  bad = c;  // a layer whose scale is NaN disagrees with any config
  bad.layers.at("fc").adapter.scale = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("\"fc\"") && Contains("scale"));
  bad = c;  // a name that is not UTF-8 cannot be written as JSON
  bad.config.target_modules.push_back("fc\xFF");
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("not valid UTF-8"));
  CHECK_FALSE(fs::exists("peft_saved/refused"));

  // A pattern key listed twice is written once, with the value peft_rank uses (the first).
  io::peft_lora_config twice;
  twice.rank_pattern = {{"fc", 2}, {"fc", 6}};
  const io::peft_lora_config read = io::parse_peft_lora_config(io::peft_lora_config_json(twice), "twice");
  REQUIRE(read.rank_pattern.size() == 1);
  CHECK(io::peft_rank(read, "fc") == io::peft_rank(twice, "fc"));

  // A config file that is a directory, or whose JSON text holds a NUL byte followed by more, is refused.
  fs::remove_all("peft_saved/config_dir");
  fs::create_directories("peft_saved/config_dir/adapter_config.json");
  REQUIRE_THROWS_WITH(io::read_peft_lora_config("peft_saved/config_dir/adapter_config.json"),
                      Contains("not a regular file"));
  REQUIRE_THROWS_WITH(io::parse_peft_lora_config(std::string("{\"r\": 8, \"lora_alpha\": 8}") + '\0' + "garbage", "nul"),
                      Contains("NUL byte"));
}

TEST_CASE("malformed PEFT adapters raise clear errors", "[peft]") {
  const std::string q = "model.layers.0.self_attn.q_proj";
  const std::string qa = "base_model.model." + q + ".lora_A.weight", qb = "base_model.model." + q + ".lora_B.weight";

  SECTION("a factor is missing (every module's are named)") {
    const std::string dir = scratch_copy("lora_f32", "missing_b");
    const std::string ka = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != qb && t.name != ka; },
                    [](io::safetensors_writer&) {});
    require_load_error(dir, {"adapter_model.safetensors", q, qb, "no", ka});
  }
  SECTION("the rank disagrees with the config") {
    const std::string dir = scratch_copy("lora_f32", "rank");
    std::string json = read_text(dir + "/adapter_config.json");
    json.replace(json.find("\"v_proj\": 2"), 11, "\"v_proj\": 3");
    write_text(dir + "/adapter_config.json", json);
    require_load_error(dir, {"v_proj", "rank 2", "rank 3"});
  }
  SECTION("A and B disagree, or B is not (out, r, 1, 1)") {
    const std::string dir = scratch_copy("lora_f32", "shapes");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != qb; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> b(8, 3);
                      b.setZero();
                      w.add(qb, b);
                    });
    require_load_error(dir, {q, "disagree on the rank"});
    const std::string dir2 = scratch_copy("lora_f32", "conv_b");
    const std::string cb = "base_model.model.model.conv1.lora_B.weight";
    rewrite_tensors(dir2, [&](const io::tensor_info& t) { return t.name != cb; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 4> b(6, 4, 1, 2);
                      b.setZero();
                      w.add(cb, b);
                    });
    require_load_error(dir2, {"model.conv1", cb, "(6, 4, 1, 2)"});
  }
  SECTION("a rank above min(out, fan_in)") {
    const std::string dir = scratch_copy("lora_f32", "wide");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != qa && t.name != qb; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> a(9, 8), b(8, 9);
                      a.setZero();
                      b.setZero();
                      w.add(qa, a);
                      w.add(qb, b);
                    });
    require_load_error(dir, {q, "rank 9", "min(out, fan_in) = 8"});
  }
  SECTION("keys PEFT LoRA does not write") {
    const std::string dir = scratch_copy("lora_f32", "unexpected");
    rewrite_tensors(dir, [](const io::tensor_info&) { return true; },
                    [](io::safetensors_writer& w) {
                      ta::tensor<float, 1> m(8);
                      m.setZero();
                      w.add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", m);
                    });
    require_load_error(dir, {"lora_magnitude_vector", "not a PEFT LoRA factor"});
    // Factors of an empty module name.
    const std::string empty_dir = scratch_copy("lora_f32", "empty_module");
    rewrite_tensors(empty_dir, [](const io::tensor_info&) { return true; }, [](io::safetensors_writer& w) {
      ta::tensor<float, 2> a(4, 8), b(8, 4);
      a.setZero();
      b.setZero();
      w.add("base_model.model..lora_A.weight", a);
      w.add("base_model.model..lora_B.weight", b);
    });
    require_load_error(empty_dir, {"base_model.model..lora_A.weight"});
  }
  SECTION("a module target_modules does not select") {
    const std::string dir = scratch_copy("lora_f32", "untargeted");
    std::string json = read_text(dir + "/adapter_config.json");
    json.replace(json.find("\"down_proj\","), 12, "");
    write_text(dir + "/adapter_config.json", json);
    require_load_error(dir, {"model.layers.0.mlp.down_proj", "target_modules"});
  }
  SECTION("configs this reader refuses") {
    const std::string dir = scratch_copy("lora_f32", "config");
    const std::string good = read_text(dir + "/adapter_config.json");
    auto with = [&](const std::string& from, const std::string& to) {
      std::string json = good;
      json.replace(json.find(from), from.size(), to);
      write_text(dir + "/adapter_config.json", json);
    };
    with("\"use_dora\": false", "\"use_dora\": true");
    require_load_error(dir, {"adapter_config.json", "use_dora"});
    with("\"peft_type\": \"LORA\"", "\"peft_type\": \"LOHA\"");
    require_load_error(dir, {"peft_type", "LOHA"});
    with("\"r\": 4", "\"r\": 0");
    require_load_error(dir, {"\"r\""});
    with("\"r\": 4", "\"r\": 4, \"r\": 5");
    require_load_error(dir, {"\"r\" appears twice"});
    with("\"v_proj\": 2", "\"v_(proj\": 2");
    require_load_error(dir, {"rank_pattern", "v_(proj", "regular expression"});
    with("\"lora_alpha\": 8", "\"lora_alpha\": \"8\"");
    require_load_error(dir, {"lora_alpha"});
    write_text(dir + "/adapter_config.json", good.substr(0, good.size() / 2));
    require_load_error(dir, {"adapter_config.json", "invalid JSON"});
    write_text(dir + "/adapter_config.json", "{\"r\": 4, \"lora_alpha\": 8, \"x\": \"\xFF\"}");
    require_load_error(dir, {"UTF-8"});
  }
  SECTION("missing files") {
    require_load_error("peft_scratch/no_such_adapter", {"no_such_adapter", "adapter_config.json", "cannot open"});
    const std::string dir = scratch_copy("lora_f32", "no_tensors");
    fs::remove(dir + "/adapter_model.safetensors");
    require_load_error(dir, {"adapter_model.safetensors", "cannot open"});
  }
}

// Configs that once crashed the parser or made matching take exponential time or unbounded stack: each
// now raises format_error (or, for a slow pattern, gives its answer) at once. The limits are
// io::max_pattern_length, max_pattern_depth, max_pattern_digits, max_pattern_states, max_pattern_lookahead(s),
// max_module_name_length and max_json_depth.
namespace {

void require_config_error(const std::string& json, const std::vector<std::string>& fragments) {
  const auto start = std::chrono::steady_clock::now();
  try {
    io::parse_peft_lora_config(json, "adapter_config.json");
    FAIL("the config was accepted");
  } catch (const io::format_error& e) {
    const std::string what = e.what();
    INFO(what.substr(0, 300));
    CHECK(what.size() < 600);  // the message quotes an excerpt, not the whole input
    for (const auto& f : fragments) CHECK_THAT(what, Contains(f));
  }
  CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 2.0);
}

std::string config_with(const std::string& field) { return "{\"r\": 2, \"lora_alpha\": 8, " + field + "}"; }

// `s` as a JSON string literal.
std::string json_string(const std::string& s) { return nlohmann::ordered_json(s).dump(); }

}  // namespace

TEST_CASE("hostile PEFT patterns and configs are refused or matched in bounded time", "[peft]") {
  SECTION("numbers too long for the regex compiler's int (signed overflow in std::regex)") {
    require_config_error(config_with("\"target_modules\": \"\\\\18446744073709551616\""),
                         {"adapter_config.json target_modules", "back-reference", "not supported"});
    require_config_error(config_with("\"rank_pattern\": {\"a{99999999999999999999}\": 1}"),
                         {"adapter_config.json rank_pattern", "more than 6 digits"});
    require_config_error(config_with("\"alpha_pattern\": {\"a{1,99999999999999999999}\": 1}"),
                         {"alpha_pattern", "more than 6 digits"});
    require_config_error(config_with("\"target_modules\": \"a{99999999999\""), {"more than 6 digits"});
    REQUIRE_THROWS_WITH(io::parse_glora_adapter_config(
                            "{\"peft_type\": \"GLORA\", \"r\": 4, \"target_modules\": \"\\\\18446744073709551616\"}",
                            "glora.json"),
                        Contains("glora.json target_modules") && Contains("back-reference"));
    // Within the digits, the repetitions are counted: the pattern would expand to too many states.
    require_config_error(config_with("\"target_modules\": \"(a{999}){999}\""), {"too large", "limit is 4000"});
    CHECK_NOTHROW(io::parse_peft_lora_config(config_with("\"target_modules\": \".*layers\\\\.\\\\d{1,3}\\\\.q_proj\""),
                                             "adapter_config.json"));
  }

  SECTION("patterns that backtrack exponentially match in polynomial time") {
    io::peft_lora_config c;
    c.r = 8;
    c.rank_pattern = {{"(a*)*b", 4}};
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t n : {std::size_t{14}, std::size_t{30}, std::size_t{200}, io::max_module_name_length}) {
      CHECK(io::peft_rank(c, std::string(n, 'a')) == 8);        // no match: (a*)*b needs a b
      CHECK(io::peft_rank(c, std::string(n - 1, 'a') + "b") == 4);
    }
    c.target_modules_regex = "(a|a)*";
    CHECK(io::peft_targets(c, std::string(io::max_module_name_length, 'a')));
    CHECK_FALSE(io::peft_targets(c, std::string(io::max_module_name_length - 1, 'a') + "b"));
    CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 2.0);
  }

  SECTION("module names longer than the limit are refused, not matched recursively") {
    io::peft_lora_config c;
    c.target_modules_regex = "(a|a)*";
    const std::string name(100000, 'a');
    REQUIRE_THROWS_WITH(io::peft_targets(c, name), Contains("100000 characters") && Contains("1000"));
    c.rank_pattern = {{"(a|a)*", 4}};
    REQUIRE_THROWS_WITH(io::peft_rank(c, name), Contains("PEFT pattern") && Contains("100000 characters"));
    REQUIRE_THROWS_WITH(io::peft_rank(c, std::string(io::max_module_name_length + 1, 'a')), Contains("1001"));
    io::glora_adapter_config g;
    g.target_modules_regex = "(a|a)*";
    REQUIRE_THROWS_WITH(io::glora_targets(g, name), Contains("GLoRA target_modules"));
  }

  SECTION("patterns too long or nested too deep for the recursive regex compiler") {
    const std::string nested = std::string(6000, '(') + "a" + std::string(6000, ')');
    require_config_error(config_with("\"target_modules\": " + json_string(nested)),
                         {"target_modules", "12001 characters"});
    require_config_error(config_with("\"rank_pattern\": {" + json_string(nested) + ": 2}"), {"rank_pattern"});
    const std::string nested400 = std::string(400, '(') + "a" + std::string(400, ')');
    require_config_error(config_with("\"target_modules\": " + json_string(nested400)),
                         {"target_modules", "nests groups more than 32 deep"});
    require_config_error(config_with("\"alpha_pattern\": {" + json_string(nested400) + ": 2}"),
                         {"alpha_pattern", "32 deep"});
    const std::string deep32 = std::string(32, '(') + "a" + std::string(32, ')');
    CHECK_NOTHROW(io::parse_peft_lora_config(config_with("\"target_modules\": " + json_string(deep32)), "c"));
    require_config_error(config_with("\"target_modules\": " + json_string("(" + deep32 + ")")), {"32 deep"});
    const std::string long_ok = "model\\." + std::string(io::max_pattern_length - 7, 'x');
    CHECK_NOTHROW(io::parse_peft_lora_config(config_with("\"target_modules\": " + json_string(long_ok)), "c"));
    require_config_error(config_with("\"target_modules\": " + json_string(long_ok + "x")),
                         {"1001 characters", "limited to 1000"});
  }

  SECTION("lookaheads: a few small ones work, nested or many are refused") {
    io::peft_lora_config c;
    c.target_modules_regex = "^(?!.*vision_tower).*\\.(q_proj|v_proj)$";
    CHECK(io::peft_targets(c, "model.language_model.layers.0.self_attn.q_proj"));
    CHECK_FALSE(io::peft_targets(c, "model.vision_tower.layers.0.self_attn.q_proj"));
    CHECK_FALSE(io::peft_targets(c, "model.language_model.layers.0.self_attn.k_proj"));
    require_config_error(config_with("\"target_modules\": \"(?!a(?=b))\""), {"lookahead in a lookahead"});
    require_config_error(config_with("\"target_modules\": \"((?!a).){2}\""), {"more than 2 lookaheads"});
    require_config_error(config_with("\"target_modules\": \"(?!(.*){40}b)\""), {"lookaheads too large"});
  }

  SECTION("JSON nested deeper than max_json_depth, and long values, are not printed whole") {
    const std::string deep = std::string(100000, '[') + std::string(100000, ']');
    require_config_error(config_with("\"peft_type\": " + deep), {"nested more than 64 deep"});
    const std::string deep63 = std::string(63, '[') + std::string(63, ']');  // 64 levels with the config object
    require_config_error(config_with("\"peft_type\": " + deep63), {"peft_type is [[[[", "..."});
    require_config_error(config_with("\"peft_type\": [" + deep63 + "]"), {"nested more than 64 deep"});
    require_config_error(config_with("\"bias\": " + json_string(std::string(100000, 'b'))), {"\"bias\" is \"bbb"});
    require_config_error(config_with("\"rank_pattern\": {" + json_string(std::string(5000, 'k')) + ": 0}"),
                         {"rank_pattern[\"kkk", "positive integer"});
    require_config_error(config_with("\"target_modules\": [" + deep63.substr(1, 124) + "]"), {"holds [[["});
  }
}

TEST_CASE("PEFT limits hold exactly at their boundaries", "[peft]") {
  SECTION("repetition counts: 6 digits are accepted, 7 refused") {
    CHECK_NOTHROW(io::parse_peft_lora_config(config_with("\"target_modules\": \"a{000001}\""), "c"));
    require_config_error(config_with("\"target_modules\": \"a{0000001}\""),
                         {"adapter_config.json target_modules", "more than 6 digits"});
    require_config_error(config_with("\"rank_pattern\": {\"a{1,0000001}\": 1}"),
                         {"rank_pattern", "more than 6 digits"});
  }
  SECTION("lookaheads: exactly max_pattern_lookaheads (2) are accepted, 3 refused") {
    const io::peft_lora_config c =
        io::parse_peft_lora_config(config_with("\"target_modules\": \"(?=a)(?=a)a\""), "adapter_config.json");
    CHECK(io::peft_targets(c, "a"));
    CHECK_FALSE(io::peft_targets(c, "b"));
    require_config_error(config_with("\"target_modules\": \"(?=a)(?=a)(?=a)a\""), {"more than 2 lookaheads"});
  }
  SECTION("r: 2^30 is accepted, 2^30 + 1 refused") {
    CHECK(io::parse_peft_lora_config(R"({"r": 1073741824, "lora_alpha": 8})", "c").r == ta::index(1) << 30);
    require_config_error(R"({"r": 1073741825, "lora_alpha": 8})", {"\"r\""});
  }
  SECTION("a layer index of 19 digits is no layer (not a std::stoll overflow)") {
    const io::peft_lora_config c = io::parse_peft_lora_config(
        R"({"r": 2, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": [0]})", "c");
    bool selected = true;
    CHECK_NOTHROW(selected = io::peft_targets(c, "model.layers.9999999999999999999.q_proj"));
    CHECK_FALSE(selected);
    CHECK(io::peft_targets(c, "model.layers.0.q_proj"));
  }
}

namespace {

// load_peft_lora of a file holding one module "m" with factors of these shapes (zeros), under `config`.
io::peft_lora_adapter<float> load_lora_factors(const std::vector<ta::index>& a_shape,
                                               const std::vector<ta::index>& b_shape,
                                               const std::string& config = R"({"r": 2, "lora_alpha": 8})") {
  io::safetensors_writer w;
  for (const auto& [key, shape] : {std::make_pair(io::peft_prefix + "m" + io::peft_a_suffix, a_shape),
                                   std::make_pair(io::peft_prefix + "m" + io::peft_b_suffix, b_shape)}) {
    ta::index size = 1;
    for (ta::index d : shape) size *= d;
    const std::vector<float> zero(static_cast<std::size_t>(size), 0.0f);
    w.add_values(key, zero.data(), shape);
  }
  const auto bytes = w.serialize();
  const io::safetensors_file file = io::safetensors_file::parse(bytes.data(), bytes.size(), "lora.safetensors");
  return io::load_peft_lora<float>(io::parse_peft_lora_config(config, "adapter_config.json"), file);
}

}  // namespace

TEST_CASE("PEFT factor shapes at the edges of what loads", "[peft]") {
  // The shapes that load: linear, and conv3d (rank 5) with B's trailing extents 1.
  CHECK(load_lora_factors({2, 3}, {4, 2}).layers.at("m").weight_shape == std::vector<ta::index>{4, 3});
  CHECK(load_lora_factors({2, 3, 1, 1, 1}, {4, 2, 1, 1, 1}).layers.at("m").weight_shape.size() == 5);
  // Factors of rank 6 are refused, even with B's trailing extents 1.
  REQUIRE_THROWS_WITH(load_lora_factors({2, 3, 1, 1, 1, 1}, {4, 2, 1, 1, 1, 1}),
                      Contains("lora.safetensors") && Contains("module \"m\"") && Contains("rank 2 to 5"));
  // B's first trailing extent (its third) must be 1 too, not only the later ones.
  REQUIRE_THROWS_WITH(load_lora_factors({2, 3, 1, 1}, {4, 2, 2, 1}),
                      Contains("(4, 2, 2, 1)") && Contains("B must be (out, r, 1…)"));
  // A rank within out but above fan_in is refused: min(out, fan_in), not out alone.
  REQUIRE_THROWS_WITH(load_lora_factors({4, 2}, {8, 4}, R"({"r": 4, "lora_alpha": 8})"),
                      Contains("module \"m\"") && Contains("rank 4") && Contains("above min(out, fan_in) = 2"));
}

// ---------------------------------------------------------------------------------------------------
// GLoRA and FLoRA files

namespace {

// The largest magnitude of a reference vector.
double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

template <class T>
void require_close(const std::vector<T>& got, const std::vector<double>& want, double tol) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("element " << i << ": " << static_cast<double>(got[i]) << " vs " << want[i]);
    REQUIRE(std::abs(static_cast<double>(got[i]) - want[i]) <= tol);
  }
}

// (W_eff, b_eff) of a loaded GLoRA layer merged into the base weights of `module` (bias if the base has one).
template <class T, int N>
std::pair<std::vector<T>, std::vector<T>> glora_merged_values(const io::glora_adapter_layer<T>& layer,
                                                              const io::safetensors_file& base,
                                                              const std::string& module) {
  const ta::tensor<T, N> w0 = base.load<T, N>(module + ".weight");
  ta::glora_merged<T, N> m;
  if (base.contains(module + ".bias")) m = ta::merge(layer.store, *layer.config, w0, base.load<T, 1>(module + ".bias"));
  else m = ta::merge(layer.store, *layer.config, w0);
  return {std::vector<T>(m.weight.data(), m.weight.data() + m.weight.size()),
          std::vector<T>(m.bias.data(), m.bias.data() + m.bias.size())};
}

template <class T>
std::vector<T> flora_delta(const io::flora_any<T>& layer) {
  return std::visit(
      [](const auto& a) {
        const auto dw = ta::delta_weight(a);
        return std::vector<T>(dw.data(), dw.data() + dw.size());
      },
      layer);
}

template <class Load>
void require_error(Load load, const std::vector<std::string>& fragments) {
  try {
    load();
    FAIL("the adapter was accepted");
  } catch (const io::format_error& e) {
    const std::string what = e.what();
    for (const auto& f : fragments) CHECK_THAT(what, Contains(f));
  }
}

void require_glora_error(const std::string& dir, const std::vector<std::string>& fragments) {
  require_error([&] { io::load_glora_adapter<double>(dir); }, fragments);
}
void require_flora_error(const std::string& dir, const std::vector<std::string>& fragments) {
  require_error([&] { io::load_flora_adapter<double>(dir); }, fragments);
}

// Every tensor of two files: same names, dtypes, shapes and bytes.
void require_same_tensors(const io::safetensors_file& a, const io::safetensors_file& b) {
  REQUIRE(a.tensors().size() == b.tensors().size());
  for (const auto& t : a.tensors()) {
    INFO("tensor " << t.name);
    REQUIRE(b.contains(t.name));
    const io::tensor_info& u = b.info(t.name);
    CHECK(u.type == t.type);
    CHECK(u.shape == t.shape);
    REQUIRE(u.end - u.begin == t.end - t.begin);
    CHECK(std::equal(b.raw(u), b.raw(u) + (u.end - u.begin), a.raw(t)));
  }
}

const std::string q_proj = "model.layers.0.self_attn.q_proj";
const std::string k_proj = "model.layers.0.self_attn.k_proj";

}  // namespace

TEMPLATE_TEST_CASE("GLoRA adapters written from PyTorch load and merge as PyTorch computes", "[glora_file]", float,
                   double) {
  using T = TestType;
  const reference::file ref("adapter_files.txt");
  const io::safetensors_file base = io::read_safetensors(peft_dir + "base_model.safetensors");
  const double eps = std::numeric_limits<T>::epsilon();

  const io::glora_adapter<T> a = io::load_glora_adapter<T>(peft_dir + "glora_f32");
  CHECK(a.config.r == 4);
  CHECK(a.config.target_modules == std::vector<std::string>{"layers.0.self_attn.q_proj", "k_proj", "down_proj", "conv1"});
  REQUIRE(a.layers.size() == 4);
  // The dictionary form of the GLoRA code ("constant", "LoRA_4") and the text form read alike.
  CHECK(*a.layers.at(k_proj).config == ta::parse_glora_config("A=scalar,B=lora_4,C=vector,D=vector,E=scalar"));
  CHECK(*a.layers.at(q_proj).config == ta::parse_glora_config("A=lora_3,B=vector,C=lora_2,D=scalar,E=vector"));
  for (const auto& [module, layer] : a.layers) {
    INFO("module " << module);
    REQUIRE(layer.config.has_value());
    CHECK(ta::max_rank(layer.store) == 4);
    const std::vector<ta::index> shape = base.info(module + ".weight").shape;
    const auto got = shape.size() == 2 ? glora_merged_values<T, 2>(layer, base, module)
                                       : glora_merged_values<T, 4>(layer, base, module);
    const std::string key = "glora_f32/" + module + "/";
    const std::vector<double> w = flat(ref, key + "w_eff", shape.size()), b = flat(ref, key + "b_eff", 1);
    const double fan_in = static_cast<double>(layer.store.Au.dimension(1));
    require_close(got.first, w, 8 * eps * (4 + 2) * max_abs(w));
    require_close(got.second, b, 8 * eps * (fan_in + 4) * max_abs(b));
  }

  const io::glora_adapter<T> s = io::load_glora_adapter<T>(peft_dir + "glora_f64_supernet");
  CHECK(s.config.target_modules_regex == ".*\\.v_proj");
  REQUIRE(s.layers.size() == 2);
  CHECK_FALSE(s.layers.at("model.layers.1.self_attn.v_proj").config.has_value());  // a supernet layer
  const auto& v = s.layers.at("model.layers.0.self_attn.v_proj");
  REQUIRE(v.config.has_value());
  const auto got = glora_merged_values<T, 2>(v, base, "model.layers.0.self_attn.v_proj");
  const std::vector<double> w = flat(ref, "glora_f64_supernet/model.layers.0.self_attn.v_proj/w_eff", 2);
  const std::vector<double> b = flat(ref, "glora_f64_supernet/model.layers.0.self_attn.v_proj/b_eff", 1);
  require_close(got.first, w, 8 * eps * 4 * max_abs(w));
  require_close(got.second, b, 8 * eps * 12 * max_abs(b));

  CHECK(io::glora_targets(a.config, "model.layers.0.self_attn.k_proj"));
  CHECK(io::glora_targets(a.config, "model.x_k_proj"));  // the GLoRA code's rule: any suffix
  CHECK_FALSE(io::glora_targets(a.config, "model.layers.1.self_attn.q_proj"));
  CHECK_FALSE(io::glora_targets(s.config, "v_proj"));  // a regular expression matches the whole name
}

TEMPLATE_TEST_CASE("FLoRA adapters in the official layout load with the mode-order conversion", "[flora_file]", float,
                   double) {
  using T = TestType;
  const reference::file ref("adapter_files.txt");
  for (const char* c : {"flora_f32", "flora_bf16"}) {
    INFO("case " << c);
    const io::flora_adapter<T> a = io::load_flora_adapter<T>(peft_dir + c);
    CHECK(a.config.scale == 4.0);
    REQUIRE(a.layers.size() == 4);
    const io::safetensors_file file = io::read_safetensors(peft_dir + c + "/adapter_model.safetensors");
    for (const auto& entry : a.layers) {
      const std::string& module = entry.first;
      const io::flora_any<T>& layer = entry.second;
      INFO("module " << module);
      std::vector<ta::index> shape;
      const std::vector<double> want = flat(ref, std::string(c) + "/" + module + "/delta_weight",
                                            io::flora_weight_shape(layer).size(), &shape);
      CHECK(io::flora_weight_shape(layer) == shape);
      const std::vector<T> got = flora_delta(layer);
      const double n = static_cast<double>(shape.size());
      require_close(got, want, 16 * std::numeric_limits<T>::epsilon() * n * 8 * max_abs(want));
      // Our U0 is the official param_1 (out), our U1 the official param_0 (in).
      std::visit(
          [&](const auto& f) {
            const std::vector<T> p1 = file.load_values<T>(module + ".flora_layer.param_1");
            const std::vector<T> p0 = file.load_values<T>(module + ".flora_layer.param_0");
            CHECK(std::equal(p1.begin(), p1.end(), f.U[0].data()));
            CHECK(std::equal(p0.begin(), p0.end(), f.U[1].data()));
            CHECK(f.U[0].dimension(0) == shape[0]);
            CHECK(static_cast<double>(f.scale) == 4.0);
          },
          layer);
    }
  }
}

TEST_CASE("GLoRA and FLoRA adapters saved by the library load back bit for bit", "[glora_file][flora_file]") {
  // Under ctest, generate_peft_files.py --check then reads these with the formats' conventions.
  for (const auto& [name, type] : {std::pair<const char*, io::dtype>{"glora_f32", io::dtype::F32},
                                   {"glora_f64_supernet", io::dtype::F64}}) {
    INFO("case " << name);
    const io::glora_adapter<double> a = io::load_glora_adapter<double>(peft_dir + name);
    const std::string out = std::string("peft_saved/") + name;
    fs::remove_all(out);
    io::save_glora_adapter(a, out, type);
    require_same_tensors(io::read_safetensors(peft_dir + name + "/adapter_model.safetensors"),
                         io::read_safetensors(out + "/adapter_model.safetensors"));
    const io::glora_adapter<double> b = io::load_glora_adapter<double>(out);
    CHECK(b.config.r == a.config.r);
    CHECK(b.config.target_modules == a.config.target_modules);
    CHECK(b.config.target_modules_regex == a.config.target_modules_regex);
    REQUIRE(b.layers.size() == a.layers.size());
    for (const auto& [module, layer] : a.layers) CHECK(b.layers.at(module).config == layer.config);
    const std::string json = read_text(out + "/adapter_config.json");
    CHECK_THAT(json, Contains("\"peft_type\": \"GLORA\""));
  }
  for (const auto& [name, type] : {std::pair<const char*, io::dtype>{"flora_f32", io::dtype::F32},
                                   {"flora_bf16", io::dtype::BF16}}) {
    INFO("case " << name);
    const io::flora_adapter<double> a = io::load_flora_adapter<double>(peft_dir + name);
    const std::string out = std::string("peft_saved/") + name;
    fs::remove_all(out);
    io::save_flora_adapter(a, out, type);
    require_same_tensors(io::read_safetensors(peft_dir + name + "/adapter_model.safetensors"),
                         io::read_safetensors(out + "/adapter_model.safetensors"));
    const io::flora_adapter<double> b = io::load_flora_adapter<double>(out);
    CHECK(b.config.scale == a.config.scale);
    CHECK(b.config.target_modules == a.config.target_modules);
    CHECK(b.layers.size() == a.layers.size());
  }
}

TEST_CASE("GLoRA and FLoRA adapters built in C++ round trip exactly", "[glora_file][flora_file]") {
  std::mt19937_64 gen(12);
  io::glora_adapter<float> g;
  g.config.r = 3;
  for (const char* m : {"enc.fc1", "enc.fc2"}) {
    auto store = ta::make_glora<float>(7, 5, {3}, gen);
    ta::for_each_parameter(store, [&](const char*, auto& t) { ta::fill_normal(t, 0.0, 0.5, gen); });
    g.layers[m].store = store;
  }
  g.layers["enc.fc1"].config = ta::parse_glora_config("A=lora_2,B=scalar,C=lora_3,D=vector,E=none");
  fs::remove_all("peft_saved/glora_built");
  io::save_glora_adapter(g, "peft_saved/glora_built");
  const auto g2 = io::load_glora_adapter<float>("peft_saved/glora_built");
  CHECK(g2.config.target_modules == std::vector<std::string>{"enc.fc1", "enc.fc2"});
  REQUIRE(g2.layers.size() == 2);
  CHECK(g2.layers.at("enc.fc1").config == g.layers.at("enc.fc1").config);
  CHECK_FALSE(g2.layers.at("enc.fc2").config.has_value());
  for (const char* m : {"enc.fc1", "enc.fc2"}) {
    std::vector<float> x, y;
    ta::for_each_parameter(g.layers.at(m).store, [&](const char*, const auto& t) { x.insert(x.end(), t.data(), t.data() + t.size()); });
    ta::for_each_parameter(g2.layers.at(m).store, [&](const char*, const auto& t) { y.insert(y.end(), t.data(), t.data() + t.size()); });
    CHECK(x == y);
  }

  io::flora_adapter<double> f;
  f.config.scale = 2.5;
  f.layers.emplace("lin", ta::make_flora<double, 2>({6, 4}, {3, 2}, 2.5, gen));
  f.layers.emplace("conv1d", ta::make_flora<double, 3>({5, 4, 3}, {2, 3, 2}, 2.5, gen));
  f.layers.emplace("conv3d", ta::make_flora<double, 5>({4, 3, 2, 3, 2}, {2, 2, 1, 2, 2}, 2.5, gen));
  for (auto& [module, layer] : f.layers)
    std::visit([&](auto& a) { ta::fill_normal(a.G, 0.0, 1.0, gen); }, layer);
  fs::remove_all("peft_saved/flora_built");
  io::save_flora_adapter(f, "peft_saved/flora_built");
  const io::safetensors_file file = io::read_safetensors("peft_saved/flora_built/adapter_model.safetensors");
  // The official mode order: param_G (r_in, r_out, r_k…), param_0 (in, r_in), param_1 (out, r_out).
  CHECK(file.info("conv3d.flora_layer.param_G").shape == std::vector<ta::index>{2, 2, 1, 2, 2});
  CHECK(file.info("conv1d.flora_layer.param_G").shape == std::vector<ta::index>{3, 2, 2});
  CHECK(file.info("conv1d.flora_layer.param_0").shape == std::vector<ta::index>{4, 3});
  CHECK(file.info("conv1d.flora_layer.param_1").shape == std::vector<ta::index>{5, 2});
  CHECK(file.info("lin.flora_layer.param_1").type == io::dtype::F64);
  const auto f2 = io::load_flora_adapter<double>("peft_saved/flora_built");
  REQUIRE(f2.layers.size() == 3);
  for (const auto& [module, layer] : f.layers) {
    INFO("module " << module);
    REQUIRE(f2.layers.at(module).index() == layer.index());
    CHECK(flora_delta(f2.layers.at(module)) == flora_delta(layer));
    CHECK(io::flora_weight_shape(f2.layers.at(module)) == io::flora_weight_shape(layer));
  }

  // Refused before anything is written.
  io::flora_adapter<double> bad_scale = f;
  std::get<ta::flora<double, 2>>(bad_scale.layers.at("lin")).scale = 1.0;
  fs::remove_all("peft_saved/refused");
  REQUIRE_THROWS_WITH(io::save_flora_adapter(bad_scale, "peft_saved/refused"), Contains("lin") && Contains("scale"));
  io::flora_adapter<double> unlisted = f;
  unlisted.config.target_modules = {"lin", "conv1d"};
  REQUIRE_THROWS_WITH(io::save_flora_adapter(unlisted, "peft_saved/refused"), Contains("conv3d") && Contains("target_modules"));
  io::flora_adapter<double> overlisted = f;  // a listed module without a layer: the loader would refuse the file
  for (const auto& kv : f.layers) overlisted.config.target_modules.push_back(kv.first);
  overlisted.config.target_modules.push_back("missing");
  REQUIRE_THROWS_WITH(io::save_flora_adapter(overlisted, "peft_saved/refused"),
                      Contains("\"missing\"") && Contains("no such layer"));
  for (const double scale : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    io::flora_adapter<double> non_finite = f;  // the loader requires a finite scale
    non_finite.config.scale = scale;
    for (auto& [module, layer] : non_finite.layers) std::visit([&](auto& l) { l.scale = scale; }, layer);
    REQUIRE_THROWS_WITH(io::save_flora_adapter(non_finite, "peft_saved/refused"), Contains("scale"));
  }
  io::glora_adapter<float> bad_rank = g;
  bad_rank.config.r = 4;
  REQUIRE_THROWS_WITH(io::save_glora_adapter(bad_rank, "peft_saved/refused"), Contains("enc.fc1") && Contains("rank 3"));
  io::glora_adapter<float> bad_config = g;
  bad_config.layers.at("enc.fc2").config = ta::parse_glora_config("A=lora_4,B=none,C=none,D=none,E=none");
  REQUIRE_THROWS_WITH(io::save_glora_adapter(bad_config, "peft_saved/refused"), Contains("enc.fc2") && Contains("lora rank 4"));
  io::glora_adapter<float> bad_store = g;
  bad_store.layers.at("enc.fc1").store.Cu.resize(3, 2);
  REQUIRE_THROWS_WITH(io::save_glora_adapter(bad_store, "peft_saved/refused"), Contains("enc.fc1") && Contains("Cu"));
  // What load_glora_adapter would refuse: an empty module name, r outside [1, 2^30], an invalid regex.
  io::glora_adapter<float> unnamed = g;
  unnamed.layers.emplace("", g.layers.begin()->second);
  REQUIRE_THROWS_WITH(io::save_glora_adapter(unnamed, "peft_saved/refused"), Contains("name is empty"));
  io::glora_adapter<float> not_utf8 = g;
  not_utf8.layers.emplace("enc.fc\xFF", g.layers.begin()->second);
  REQUIRE_THROWS_WITH(io::save_glora_adapter(not_utf8, "peft_saved/refused"), Contains("not valid UTF-8"));
  io::glora_adapter<float> empty;
  empty.config.r = 0;
  REQUIRE_THROWS_WITH(io::save_glora_adapter(empty, "peft_saved/refused"), Contains("\"r\""));
  empty.config.r = 2;
  empty.config.target_modules_regex = "(";
  REQUIRE_THROWS_WITH(io::save_glora_adapter(empty, "peft_saved/refused"), Contains("regular expression"));
  CHECK_FALSE(fs::exists("peft_saved/refused"));
}

TEST_CASE("malformed GLoRA and FLoRA adapters raise clear errors", "[glora_file][flora_file]") {
  const std::string qk = "base_model.model." + q_proj + ".";
  SECTION("GLoRA: tensors are missing (every module's are named)") {
    const std::string dir = scratch_copy("glora_f32", "glora_missing");
    const std::string kd = "base_model.model." + k_proj + ".glora_D";
    rewrite_tensors(dir,
                    [&](const io::tensor_info& t) {
                      return t.name != qk + "glora_Cu" && t.name != qk + "glora_E" && t.name != kd;
                    },
                    [](io::safetensors_writer&) {});
    require_glora_error(dir, {"adapter_model.safetensors", q_proj, qk + "glora_Cu", qk + "glora_E", "lacks", kd});
  }
  SECTION("GLoRA: a tensor is mis-shaped") {
    const std::string dir = scratch_copy("glora_f32", "glora_shape");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != qk + "glora_Bu"; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> bu(4, 7);
                      bu.setZero();
                      w.add(qk + "glora_Bu", bu);
                    });
    require_glora_error(dir, {q_proj, qk + "glora_Bu", "(4, 7)", "expected (4, 8)"});
  }
  SECTION("GLoRA: a store whose rank is above min(O, I)") {
    const std::string dir = scratch_copy("glora_f32", "glora_wide");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name.rfind(qk + "glora_", 0) != 0; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> d(8, 9), u(9, 8), cu(9, 1);
                      ta::tensor<float, 1> v(8);
                      for (auto* t : {&d, &u, &cu}) t->setZero();
                      v.setZero();
                      for (const char* k : {"glora_Ad", "glora_Bd", "glora_Cd"}) w.add(qk + k, d);
                      for (const char* k : {"glora_Au", "glora_Bu"}) w.add(qk + k, u);
                      w.add(qk + "glora_Cu", cu);
                      for (const char* k : {"glora_D", "glora_E"}) w.add(qk + k, v);
                    });
    require_glora_error(dir, {q_proj, "rank 9", "min(O, I) = 8"});
    // The config's r itself above min(O, I) of a narrow module: (2, 8) at R 4.
    const std::string narrow = "base_model.model.model.extra.down_proj.";
    rewrite_tensors(dir, [&](const io::tensor_info&) { return true; }, [&](io::safetensors_writer& w) {
      ta::tensor<float, 2> d(2, 4), u(4, 8), cd(8, 4), cu(4, 1);
      ta::tensor<float, 1> v(2);
      for (auto* t : {&d, &u, &cd, &cu}) t->setZero();
      v.setZero();
      for (const char* k : {"glora_Ad", "glora_Bd"}) w.add(narrow + k, d);
      for (const char* k : {"glora_Au", "glora_Bu"}) w.add(narrow + k, u);
      w.add(narrow + "glora_Cd", cd);
      w.add(narrow + "glora_Cu", cu);
      for (const char* k : {"glora_D", "glora_E"}) w.add(narrow + k, v);
    });
    require_glora_error(dir, {"model.extra.down_proj", "rank 4", "min(O, I) = 2"});
  }
  SECTION("GLoRA: keys the format does not have") {
    const std::string dir = scratch_copy("glora_f32", "glora_key");
    rewrite_tensors(dir, [](const io::tensor_info&) { return true; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 1> x(8);
                      x.setZero();
                      w.add(qk + "glora_F", x);
                    });
    require_glora_error(dir, {qk + "glora_F", "not a GLoRA store tensor"});
  }
  SECTION("GLoRA: configs that do not fit the tensors") {
    const std::string dir = scratch_copy("glora_f32", "glora_config");
    const std::string good = read_text(dir + "/adapter_config.json");
    auto with = [&](const std::string& from, const std::string& to) {
      std::string json = good;
      REQUIRE(json.find(from) != std::string::npos);
      json.replace(json.find(from), from.size(), to);
      write_text(dir + "/adapter_config.json", json);
    };
    with("\"r\": 4", "\"r\": 5");
    require_glora_error(dir, {"model.conv1", "maximum rank 4", "r is 5"});
    with("\"k_proj\",", "");
    require_glora_error(dir, {k_proj, "target_modules"});
    with("\"model.conv1\": \"A=lora_4,B=lora_2,C=vector", "\"model.conv1\": \"A=lora_4,B=lora_2,C=scalar");
    require_glora_error(dir, {"eval_config[\"model.conv1\"]", "C cannot be scalar"});
    with("\"model.conv1\": \"A=lora_4", "\"model.conv1\": \"A=lora_5");
    require_glora_error(dir, {"eval_config[\"model.conv1\"]", "lora rank 5"});
    with("\"model.conv1\": \"A=lora_4", "\"model.conv2\": \"A=lora_4");
    require_glora_error(dir, {"eval_config names module \"model.conv2\"", "no tensors"});
    with("\"B\": \"LoRA_4\",", "");
    require_glora_error(dir, {k_proj, "\"B\""});
    with("\"peft_type\": \"GLORA\"", "\"peft_type\": \"LORA\"");
    require_glora_error(dir, {"peft_type", "\"LORA\"", "\"GLORA\""});
    with("\"peft_type\": \"GLORA\",", "");
    require_glora_error(dir, {"peft_type", "missing"});
    // PEFT's narrowing keys are not the GLoRA code's rule: refused rather than ignored.
    with("\"peft_type\": \"GLORA\",", "\"peft_type\": \"GLORA\", \"layers_to_transform\": [0],");
    require_glora_error(dir, {"layers_to_transform", "[0]", "target_modules alone"});
    with("\"peft_type\": \"GLORA\",", "\"peft_type\": \"GLORA\", \"exclude_modules\": \"k_proj\",");
    require_glora_error(dir, {"exclude_modules", "target_modules alone"});
    with("\"layers.0.self_attn.q_proj\",\n    \"k_proj\",\n    \"down_proj\",\n    \"conv1\"", "");
    require_glora_error(dir, {"\"target_modules\" is an empty list"});
  }
  SECTION("FLoRA: a parameter is missing") {
    require_flora_error(peft_dir + "flora_f32_missing_param",
                        {"flora_f32_missing_param", "model.conv1", "lacks model.conv1.flora_layer.param_2"});
    // Every problem of the file at once, one per line.
    const std::string both = scratch_copy("flora_f32_missing_param", "flora_two_problems");
    rewrite_tensors(both, [&](const io::tensor_info& t) { return t.name != "model.proj_1x1.flora_layer.param_3"; },
                    [](io::safetensors_writer&) {});
    require_flora_error(both, {"lacks model.conv1.flora_layer.param_2\n", "lacks model.proj_1x1.flora_layer.param_3"});
    const std::string dir = scratch_copy("flora_f32", "flora_no_core");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != "model.proj_1x1.flora_layer.param_G"; },
                    [](io::safetensors_writer&) {});
    require_flora_error(dir, {"model.proj_1x1", "no model.proj_1x1.flora_layer.param_G"});
  }
  SECTION("FLoRA: a parameter is mis-shaped or surplus") {
    const std::string p1 = q_proj + ".flora_layer.param_1";
    const std::string dir = scratch_copy("flora_f32", "flora_shape");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != p1; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> p(8, 3);
                      p.setZero();
                      w.add(p1, p);
                    });
    require_flora_error(dir, {q_proj, p1, "(8, 3)", "(extent, 2)"});
    const std::string dir2 = scratch_copy("flora_f32", "flora_surplus");
    rewrite_tensors(dir2, [](const io::tensor_info&) { return true; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> p(8, 2);
                      p.setZero();
                      w.add(q_proj + ".flora_layer.param_2", p);
                    });
    require_flora_error(dir2, {q_proj + ".flora_layer.param_2", "no mode"});
    const std::string dir3 = scratch_copy("flora_f32", "flora_twice");
    rewrite_tensors(dir3, [](const io::tensor_info&) { return true; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> g(3, 2);
                      g.setZero();
                      w.add(q_proj + ".param_G", g);
                    });
    require_flora_error(dir3, {q_proj, "param_G twice"});
    const std::string dir4 = scratch_copy("flora_f32", "flora_key");
    rewrite_tensors(dir4, [](const io::tensor_info&) { return true; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> g(3, 2);
                      g.setZero();
                      w.add(q_proj + ".flora_layer.lora_A", g);
                    });
    require_flora_error(dir4, {"lora_A", "not an official FLoRA parameter"});
  }
  SECTION("FLoRA: configs that do not fit the tensors") {
    const std::string dir = scratch_copy("flora_f32", "flora_config");
    const std::string good = read_text(dir + "/adapter_config.json");
    auto with = [&](const std::string& from, const std::string& to) {
      std::string json = good;
      REQUIRE(json.find(from) != std::string::npos);
      json.replace(json.find(from), from.size(), to);
      write_text(dir + "/adapter_config.json", json);
    };
    with("\"model.conv1\",", "");
    require_flora_error(dir, {"model.conv1", "does not list it"});
    with("\"model.conv1\",", "\"model.conv1\", \"model.conv2\",");
    require_flora_error(dir, {"lists \"model.conv2\"", "model.conv2.flora_layer.param_G"});
    with("\"scale\": 4", "\"scale\": \"4\"");
    require_flora_error(dir, {"adapter_config.json", "\"scale\""});
    with("\"FLORA\"", "\"LORA\"");
    require_flora_error(dir, {"peft_type", "\"FLORA\""});
  }
  SECTION("FLoRA: a weight of more elements than an index can count") {
    // A 1 MB file: core (1, 1, 1, 1) and four factors (65536, 1), so a weight of 2^64 elements.
    io::safetensors_writer w;
    ta::tensor<float, 4> g(1, 1, 1, 1);
    g.setConstant(1.0f);
    ta::tensor<float, 2> u(65536, 1);
    u.setConstant(0.5f);
    w.add("m.flora_layer.param_G", g);
    for (int n = 0; n < 4; ++n) w.add("m.flora_layer.param_" + std::to_string(n), u);
    const auto bytes = w.serialize();
    const io::safetensors_file file = io::safetensors_file::parse(bytes.data(), bytes.size(), "huge.safetensors");
    REQUIRE_THROWS_WITH(io::load_flora_adapter<float>(R"({"peft_type": "FLORA", "scale": 1})", "cfg", file),
                        Contains("module \"m\"") && Contains("beyond the largest index"));
  }
}

namespace {

// A file (in memory, named `name`) of F32 tensors of these names and shapes, filled with 0.5.
io::safetensors_file tensors_file(const std::vector<std::pair<std::string, std::vector<ta::index>>>& tensors,
                                  const std::string& name) {
  io::safetensors_writer w;
  for (const auto& [key, shape] : tensors) {
    ta::index size = 1;
    for (ta::index d : shape) size *= d;
    const std::vector<float> values(static_cast<std::size_t>(size), 0.5f);
    w.add_values(key, values.data(), shape);
  }
  const auto bytes = w.serialize();
  return io::safetensors_file::parse(bytes.data(), bytes.size(), name);
}

// The eight GLoRA store tensors of `module` for (O, I, R).
std::vector<std::pair<std::string, std::vector<ta::index>>> glora_store_tensors(const std::string& module, ta::index o,
                                                                                ta::index i, ta::index r) {
  const std::string p = io::peft_prefix + module + ".";
  return {{p + "glora_Ad", {o, r}}, {p + "glora_Au", {r, i}}, {p + "glora_Bd", {o, r}}, {p + "glora_Bu", {r, i}},
          {p + "glora_Cd", {i, r}}, {p + "glora_Cu", {r, 1}}, {p + "glora_D", {o}},     {p + "glora_E", {o}}};
}

}  // namespace

TEST_CASE("GLoRA and FLoRA files at the edges of what loads", "[glora_file][flora_file]") {
  const std::string glora_r2 = R"({"peft_type": "GLORA", "r": 2})";
  const std::string flora_cfg = R"({"peft_type": "FLORA", "scale": 1})";

  SECTION("GLoRA: an eval_config object with a key besides A … E") {
    const std::string dict = R"({"A": "LoRA_2", "B": "vector", "C": "none", "D": "constant", "E": "vector")";
    CHECK_NOTHROW(io::parse_glora_adapter_config(
        R"({"peft_type": "GLORA", "r": 2, "eval_config": {"m": )" + dict + "}}}", "glora.json"));
    REQUIRE_THROWS_WITH(io::parse_glora_adapter_config(
                            R"({"peft_type": "GLORA", "r": 2, "eval_config": {"m": )" + dict + R"(, "F": "none"}}})",
                            "glora.json"),
                        Contains("eval_config[\"m\"]") && Contains("keys other than A, B, C, D, E"));
  }
  SECTION("GLoRA: a store of an empty module name") {
    // The store loads under a module name; the same tensors without one are refused (as for LoRA).
    CHECK(io::load_glora_adapter<float>(glora_r2, "cfg", tensors_file(glora_store_tensors("m", 2, 2, 2), "g.st"))
              .layers.count("m") == 1);
    REQUIRE_THROWS_WITH(
        io::load_glora_adapter<float>(glora_r2, "cfg", tensors_file(glora_store_tensors("", 2, 2, 2), "g.st")),
        Contains("\"base_model.model..glora_Ad\"") && Contains("\"base_model.model..glora_D\"") &&
            Contains("not a GLoRA store tensor"));
  }
  SECTION("GLoRA: a rank within O but above I") {
    // O = 8, I = 2, R = 4: min(O, I), not O alone.
    REQUIRE_THROWS_WITH(io::load_glora_adapter<float>(R"({"peft_type": "GLORA", "r": 4})", "cfg",
                                                      tensors_file(glora_store_tensors("m", 8, 2, 4), "g.st")),
                        Contains("module \"m\"") && Contains("rank 4") && Contains("above min(O, I) = 2"));
  }
  SECTION("FLoRA: param_<n> takes a single digit") {
    REQUIRE_THROWS_WITH(io::load_flora_adapter<float>(flora_cfg, "cfg",
                                                      tensors_file({{"m.flora_layer.param_G", {2, 2}},
                                                                    {"m.flora_layer.param_00", {4, 2}},
                                                                    {"m.flora_layer.param_1", {3, 2}}},
                                                                   "f.st")),
                        Contains("\"m.flora_layer.param_00\"") && Contains("not an official FLoRA parameter"));
  }
  SECTION("FLoRA: a core of 6 modes") {
    std::vector<std::pair<std::string, std::vector<ta::index>>> t = {{"m.flora_layer.param_G", {1, 1, 1, 1, 1, 2}}};
    for (int n = 0; n < 6; ++n) t.push_back({"m.flora_layer.param_" + std::to_string(n), {2, n == 5 ? 2 : 1}});
    REQUIRE_THROWS_WITH(io::load_flora_adapter<float>(flora_cfg, "cfg", tensors_file(t, "f.st")),
                        Contains("module \"m\"") && Contains("(1, 1, 1, 1, 1, 2)") &&
                            Contains("the core has rank 2 (linear) to 5 (conv3d)"));
  }
  SECTION("FLoRA: a factor whose extent is below its rank is a format_error naming the file and tensor") {
    const io::safetensors_file file = tensors_file(
        {{"m.flora_layer.param_G", {3, 2}}, {"m.flora_layer.param_0", {2, 3}}, {"m.flora_layer.param_1", {4, 2}}},
        "narrow.safetensors");
    REQUIRE_THROWS_AS(io::load_flora_adapter<float>(flora_cfg, "cfg", file), io::format_error);
    REQUIRE_THROWS_WITH(io::load_flora_adapter<float>(flora_cfg, "cfg", file),
                        Contains("narrow.safetensors") && Contains("m.flora_layer.param_0") &&
                            Contains("(2, 3)") && Contains("extent ≥ 3"));
  }
}

// Run by ctest after examples/merge_adapter: TA_MERGED_FILE is the file it wrote from
// peft/base_model.safetensors and the adapter peft/<TA_MERGED_CASE> (default lora_f32); TA_MERGED_CHANGED
// is the number of base tensors the merge changed (default 8, lora_f32's modules) and TA_MERGED_ADDED the
// number it added (GLoRA biases; default 0).
TEST_CASE("merge_adapter output matches PyTorch's merged weights", "[.merge_adapter_output]") {
  const char* path = std::getenv("TA_MERGED_FILE");
  const char* case_name = std::getenv("TA_MERGED_CASE");
  const char* changed_env = std::getenv("TA_MERGED_CHANGED");
  const char* added_env = std::getenv("TA_MERGED_ADDED");
  REQUIRE(path != nullptr);
  const std::string c = case_name ? case_name : "lora_f32";
  const std::size_t expected_changed = changed_env ? static_cast<std::size_t>(std::atoi(changed_env)) : 8;
  const io::safetensors_file merged = io::read_safetensors(path);
  const io::safetensors_file base = io::read_safetensors(peft_dir + "base_model.safetensors");
  const reference::file ref(c.rfind("lora", 0) == 0 ? "peft_lora.txt" : "adapter_files.txt");
  const std::size_t added = added_env ? static_cast<std::size_t>(std::atoi(added_env)) : 0;
  REQUIRE(merged.tensors().size() == base.tensors().size() + added);
  std::size_t changed = 0, new_tensors = 0;
  for (const auto& u : merged.tensors()) {
    INFO("tensor " << u.name);
    const bool in_base = base.contains(u.name);
    if (in_base) {
      const io::tensor_info& t = base.info(u.name);
      CHECK(u.type == t.type);
      CHECK(u.shape == t.shape);
      if (!io::is_floating(t.type)) {  // copied byte for byte
        REQUIRE(u.end - u.begin == t.end - t.begin);
        CHECK(std::equal(merged.raw(u), merged.raw(u) + (u.end - u.begin), base.raw(t)));
        continue;
      }
    } else {
      CHECK(u.type == io::dtype::F32);
      ++new_tensors;
    }
    const std::vector<double> got = merged.load_values<double>(u.name);
    const std::string key = "merged/" + c + "/" + u.name;
    REQUIRE(ref.has(key));
    const std::vector<double> want = flat(ref, key, u.shape.size());
    REQUIRE(got.size() == want.size());
    const std::vector<double> before = in_base ? base.load_values<double>(u.name) : std::vector<double>();
    bool differs = false;
    for (std::size_t i = 0; i < got.size(); ++i) {
      // One rounding to F32 of a float64 result (which may differ from PyTorch's in the last bits).
      REQUIRE(std::abs(got[i] - want[i]) <= std::abs(want[i]) * std::ldexp(1.0, -24) * 1.0000001 + 1e-13);
      differs = differs || (in_base && got[i] != before[i]);
    }
    changed += differs;
  }
  CHECK(new_tensors == added);
  CHECK(changed == expected_changed);
}

// Hidden test cases around examples/merge_adapter's --dtype conversion (ctest runs them with the tool):
// [.merge_adapter_masked_base] writes the base weights with two extra tensors, a mask holding -inf and a
// value beyond half's range (paths in TA_MASKED_BASE and TA_HUGE_BASE); [.merge_adapter_masked_output]
// checks that the mask came through a conversion to BF16 with its -inf (TA_MASKED_OUTPUT).
TEST_CASE("merge_adapter test input: base weights with a mask and a large value", "[.merge_adapter_masked_base]") {
  const char* masked = std::getenv("TA_MASKED_BASE");
  const char* huge = std::getenv("TA_HUGE_BASE");
  REQUIRE(masked != nullptr);
  REQUIRE(huge != nullptr);
  const io::safetensors_file base = io::read_safetensors(peft_dir + "base_model.safetensors");
  for (const auto& [path, name, value] :
       {std::tuple<std::string, std::string, float>{masked, "model.causal_mask", -std::numeric_limits<float>::infinity()},
        std::tuple<std::string, std::string, float>{huge, "model.scale", 1.0e6f}}) {
    io::safetensors_writer w;
    for (const io::tensor_info& t : base.tensors())
      w.add_raw(t.name, t.type, t.shape, base.raw(t), static_cast<std::size_t>(t.end - t.begin));
    ta::tensor<float, 1> extra(4);
    extra.setValues({0.0f, value, 0.0f, 1.0f});
    w.add(name, extra);
    w.write(path);
  }
}

TEST_CASE("merge_adapter keeps a converted tensor's infinities", "[.merge_adapter_masked_output]") {
  const char* path = std::getenv("TA_MASKED_OUTPUT");
  REQUIRE(path != nullptr);
  const io::safetensors_file merged = io::read_safetensors(path);
  CHECK(merged.info("model.causal_mask").type == io::dtype::BF16);
  const std::vector<float> mask = merged.load_values<float>("model.causal_mask");
  REQUIRE(mask.size() == 4);
  CHECK(mask[1] == -std::numeric_limits<float>::infinity());
  CHECK(mask[3] == 1.0f);
}
