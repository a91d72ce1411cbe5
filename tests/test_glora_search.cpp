// GLoRA evolutionary search: finds the known optimum of synthetic fitness functions (or comes within a
// stated margin), beats random sampling at an equal number of evaluations, never evaluates or returns a
// candidate over the budget, evaluates each candidate once, reports every generation, is reproducible
// from its seed, and rejects bad input before any fitness call.
#include <tensor_adapters/glora_search.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace ta = tensor_adapters;

namespace {

// Fitness = how many support-tensor choices agree with a hidden target (one configuration per layer).
struct match_target {
  std::vector<ta::glora_config> target;
  double operator()(const std::vector<ta::glora_config>& c) const {
    double s = 0;
    for (std::size_t l = 0; l < c.size(); ++l)
      s += (c[l].A == target[l].A) + (c[l].B == target[l].B) + (c[l].C == target[l].C) + (c[l].D == target[l].D) +
           (c[l].E == target[l].E);
    return s;
  }
};

std::vector<ta::glora_config> random_target(const ta::glora_space& space, std::size_t layers, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<ta::glora_config> t;
  for (std::size_t l = 0; l < layers; ++l) t.push_back(ta::random_glora_config(space, gen));
  return t;
}

// The best fitness among `n` uniformly random candidates within the budget.
template <class Fitness>
double random_sampling(const std::vector<ta::glora_layer_shape>& layers, const ta::glora_space& space, Fitness& f,
                       ta::index n, ta::index budget, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  double best = -std::numeric_limits<double>::infinity();
  for (ta::index k = 0; k < n;) {
    std::vector<ta::glora_config> c;
    for (std::size_t l = 0; l < layers.size(); ++l) c.push_back(ta::random_glora_config(space, gen));
    if (ta::parameter_count(c, layers) > budget) continue;
    best = std::max(best, f(c));
    ++k;
  }
  return best;
}

}  // namespace

TEST_CASE("the options default to the official search's", "[glora_search]") {
  const ta::glora_search_options o;
  CHECK(o.population == 50);
  CHECK(o.top_k == 10);
  CHECK(o.generations == 20);
  CHECK(o.mutations == 25);
  CHECK(o.mutation_probability == 0.2);
  CHECK(o.crossovers == 25);
  CHECK(o.parameter_budget == std::numeric_limits<ta::index>::max());
}

TEST_CASE("search finds the optimum of a separable fitness and beats random sampling", "[glora_search]") {
  // Fitness = the number of support-tensor choices that agree with a hidden target; the optimum (the
  // target itself) scores 5 per layer. Random sampling gets the same number of evaluations (1000).
  const auto space = ta::make_glora_space(std::vector<ta::index>{4, 8});
  for (std::size_t depth : {4u, 8u}) {
    // 4 layers: (5·5·4·3·3)^4 ≈ 10^11 candidates; 8 layers: ≈ 10^23.
    const std::vector<ta::glora_layer_shape> layers(depth, {24, 16, 8});
    const double optimum = 5.0 * double(depth);
    int exact = 0;
    for (std::uint64_t seed = 1; seed <= 5; ++seed) {
      const match_target f{random_target(space, layers.size(), 100 + seed)};
      ta::glora_search_options options;
      options.seed = seed;
      const auto result = ta::evolutionary_search(layers, space, f, options);
      INFO(depth << " layers, seed " << seed << ": " << ta::to_string(result.configs));
      CHECK(result.evaluations == options.population * options.generations);
      CHECK(result.fitness == f(result.configs));
      CHECK(result.parameters == ta::parameter_count(result.configs, layers));
      exact += result.fitness == optimum;
      // The stated margins: with 4 layers within 1 of the optimum (and exact for most seeds); with 8
      // layers within 15% (34 of 40), where random sampling reaches about half.
      CHECK(result.fitness >= (depth == 4 ? optimum - 1 : 0.85 * optimum));
      const double random_best = random_sampling(layers, space, f, result.evaluations,
                                                 std::numeric_limits<ta::index>::max(), 200 + seed);
      CHECK(result.fitness >= random_best + (depth == 4 ? 5 : 10));
    }
    if (depth == 4) CHECK(exact >= 4);
  }
}

TEST_CASE("under a budget, search finds the largest parameter count that fits and never exceeds it",
          "[glora_search]") {
  // Fitness = the parameter count itself: the optimum is the largest achievable total ≤ budget, found
  // exactly by a subset-sum over the per-choice counts.
  const std::vector<ta::glora_layer_shape> layers{{6, 5, 4}, {7, 3, 3}, {5, 5, 4}, {4, 6, 4}, {8, 4, 4}, {5, 7, 4}};
  const auto space = ta::make_glora_space(std::vector<ta::index>{1, 3});
  std::vector<char> reachable{1};
  for (const auto& s : layers) {
    std::vector<char> next;
    for (const auto& c : ta::enumerate_glora_configs(space)) {
      const ta::index p = ta::parameter_count(c, s.out, s.in);
      if (next.size() < reachable.size() + std::size_t(p)) next.resize(reachable.size() + std::size_t(p), 0);
      for (std::size_t v = 0; v < reachable.size(); ++v)
        if (reachable[v]) next[v + std::size_t(p)] = 1;
    }
    reachable = next;
  }
  for (ta::index budget : {150, 333, 401}) {
    ta::index optimum = budget;
    while (!reachable[std::size_t(optimum)]) --optimum;
    ta::index over = 0, calls = 0;
    std::set<std::string> seen;
    bool repeated = false;
    auto f = [&](const std::vector<ta::glora_config>& c) {
      const ta::index p = ta::parameter_count(c, layers);
      over += p > budget;
      ++calls;
      repeated = repeated || !seen.insert(ta::to_string(c)).second;
      return double(p);
    };
    ta::glora_search_options options;
    options.parameter_budget = budget;
    options.seed = 7;
    const auto result = ta::evolutionary_search(layers, space, f, options);
    INFO("budget " << budget << ", optimum " << optimum << ", found " << result.parameters);
    CHECK(over == 0);
    CHECK_FALSE(repeated);
    CHECK(calls == result.evaluations);
    CHECK(result.parameters <= budget);
    CHECK(result.fitness == double(result.parameters));
    // The stated margin: within 1% of the optimum.
    CHECK(double(result.parameters) >= 0.99 * double(optimum));
    CHECK(result.fitness >= random_sampling(layers, space, f, result.evaluations, budget, 9));
  }
}

TEST_CASE("same seed, same search; progress is reported every generation", "[glora_search]") {
  const std::vector<ta::glora_layer_shape> layers(4, {16, 12, 4});
  const auto space = ta::make_glora_space(4);
  const match_target f{random_target(space, layers.size(), 5)};
  ta::glora_search_options options;
  options.seed = 42;
  options.generations = 6;
  options.parameter_budget = 400;
  std::vector<ta::glora_search_progress> reports;
  std::vector<std::string> calls_a, calls_b;
  auto fa = [&](const std::vector<ta::glora_config>& c) { calls_a.push_back(ta::to_string(c)); return f(c); };
  auto fb = [&](const std::vector<ta::glora_config>& c) { calls_b.push_back(ta::to_string(c)); return f(c); };
  const auto a = ta::evolutionary_search(layers, space, fa, options,
                                         [&](const ta::glora_search_progress& p) { reports.push_back(p); });
  const auto b = ta::evolutionary_search(layers, space, fb, options);
  CHECK(a.configs == b.configs);
  CHECK(a.fitness == b.fitness);
  CHECK(a.parameters == b.parameters);
  CHECK(calls_a == calls_b);
  options.seed = 43;
  std::vector<std::string> calls_c;
  auto fc = [&](const std::vector<ta::glora_config>& c) { calls_c.push_back(ta::to_string(c)); return f(c); };
  ta::evolutionary_search(layers, space, fc, options);
  CHECK(calls_c != calls_a);

  REQUIRE(reports.size() == 6);
  ta::index total = 0;
  for (std::size_t g = 0; g < reports.size(); ++g) {
    const auto& p = reports[g];
    CHECK(p.generation == ta::index(g));
    total += p.evaluated;
    CHECK(p.evaluations == total);
    CHECK(p.evaluated <= options.population);
    CHECK(p.top_k_fitness.size() <= std::size_t(options.top_k));
    CHECK(std::is_sorted(p.top_k_fitness.rbegin(), p.top_k_fitness.rend()));
    CHECK(p.best_fitness == p.top_k_fitness.front());
    CHECK(p.best_fitness == f(p.best));
    CHECK(p.best_parameters == ta::parameter_count(p.best, layers));
    CHECK(p.best_parameters <= options.parameter_budget);
    if (g > 0) CHECK(p.best_fitness >= reports[g - 1].best_fitness);
  }
  CHECK(total == a.evaluations);
  CHECK(ta::index(calls_a.size()) == a.evaluations);
  CHECK(reports.back().best == a.configs);
}

TEST_CASE("a budget only the cheapest candidate meets still gives a result", "[glora_search]") {
  const std::vector<ta::glora_layer_shape> layers(6, {10, 10, 2});
  const auto space = ta::make_glora_space(2);
  ta::index calls = 0;
  auto f = [&](const std::vector<ta::glora_config>&) { ++calls; return 1.0; };
  ta::glora_search_options options;
  options.parameter_budget = 0;
  options.generations = 3;
  const auto result = ta::evolutionary_search(layers, space, f, options);
  CHECK(result.parameters == 0);
  CHECK(result.configs == std::vector<ta::glora_config>(6, ta::glora_config{}));
  CHECK(result.evaluations == 1);
  CHECK(calls == 1);
}

TEST_CASE("the result round-trips through the text form", "[glora_search]") {
  const std::vector<ta::glora_layer_shape> layers(5, {32, 32, 8});
  const auto space = ta::make_glora_space(std::vector<ta::index>{8, 4});
  const match_target f{random_target(space, layers.size(), 8)};
  ta::glora_search_options options;
  options.generations = 3;
  const auto result = ta::evolutionary_search(layers, space, f, options);
  CHECK(ta::parse_glora_configs(ta::to_string(result.configs)) == result.configs);
}

TEST_CASE("bad search input throws argument_error before any fitness call", "[glora_search]") {
  const std::vector<ta::glora_layer_shape> layers(3, {16, 12, 4});
  const auto space = ta::make_glora_space(4);
  ta::index calls = 0;
  auto f = [&](const std::vector<ta::glora_config>&) { ++calls; return 0.0; };
  const ta::glora_search_options ok;

  CHECK_THROWS_WITH(ta::evolutionary_search({}, space, f, ok), Catch::Contains("evolutionary_search") && Catch::Contains("no layers"));
  // A rank above a layer's R.
  std::vector<ta::glora_layer_shape> small = layers;
  small[1].max_rank = 2;
  CHECK_THROWS_WITH(ta::evolutionary_search(small, space, f, ok), Catch::Contains("layer 1") && Catch::Contains("R = 2"));
  // The boundary: a space of rank R + 1 for layers of rank R.
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, ta::make_glora_space(5), f, ok),
                    Catch::Contains("lora rank 5") && Catch::Contains("R = 4"));
  // A maximum rank above min(out, in), which no store of that layer can hold.
  std::vector<ta::glora_layer_shape> narrow = layers;
  narrow[0] = {16, 3, 4};
  CHECK_THROWS_WITH(ta::evolutionary_search(narrow, space, f, ok), Catch::Contains("layer 0") && Catch::Contains("above min(out, in)"));
  CHECK_THROWS_AS(ta::parameter_count(std::vector<ta::glora_config>(3), narrow), ta::argument_error);
  // parameter_count checks each layer's R: one of 0 does not switch the rank check off.
  const auto config = ta::parse_glora_config("A=lora_100,B=lora_7,C=lora_50,D=none,E=none");
  CHECK_THROWS_AS(ta::parameter_count({config}, {ta::glora_layer_shape{4, 4, 0}}), ta::argument_error);
  // Layers whose parameter counts do not fit an index, alone (2^62 × 2^62: the counts used to wrap,
  // and the search returned an over-budget configuration) or added up: two layers of 2^30 × 2^30 at
  // rank 2^30 count about 2^62.2 each.
  const std::vector<ta::glora_layer_shape> huge{{ta::index(1) << 62, ta::index(1) << 62, 8}};
  ta::glora_search_options tight = ok;
  tight.parameter_budget = 10;
  CHECK_THROWS_WITH(ta::evolutionary_search(huge, space, f, tight), Catch::Contains("beyond an index"));
  const ta::index g = ta::index(1) << 30;
  const std::vector<ta::glora_layer_shape> two(2, {g, g, g});
  CHECK_THROWS_WITH(ta::evolutionary_search(two, ta::make_glora_space(g), f, ok),
                    Catch::Contains("add up beyond an index"));
  const auto lora_g = ta::glora_choice::lora(g);
  const ta::glora_config dear{lora_g, lora_g, lora_g, ta::glora_choice::vector(), ta::glora_choice::vector()};
  CHECK_THROWS_WITH(ta::parameter_count({dear, dear}, two), Catch::Contains("add up beyond an index"));
  CHECK(ta::parameter_count({dear}, {two[0]}) > (ta::index(1) << 62));  // one layer still counts
  // An empty layer.
  std::vector<ta::glora_layer_shape> empty = layers;
  empty[2].in = 0;
  CHECK_THROWS_AS(ta::evolutionary_search(empty, space, f, ok), ta::argument_error);
  // Illegal kinds in the space, an empty list, a repeat.
  ta::glora_space bad = space;
  bad.C.push_back(ta::glora_choice::scalar());
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, bad, f, ok), Catch::Contains("C cannot be scalar"));
  bad = space;
  bad.D.push_back(ta::glora_choice::lora(2));
  CHECK_THROWS_AS(ta::evolutionary_search(layers, bad, f, ok), ta::argument_error);
  bad = space;
  bad.A.push_back(ta::glora_choice{static_cast<ta::glora_kind>(11), 0});
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, bad, f, ok), Catch::Contains("unknown kind"));
  bad = space;
  bad.B.clear();
  CHECK_THROWS_AS(ta::evolutionary_search(layers, bad, f, ok), ta::argument_error);
  bad = space;
  bad.E.push_back(ta::glora_choice::none());
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, bad, f, ok), Catch::Contains("twice"));
  // A budget no configuration set meets: a negative one, and one below a space without `none`.
  ta::glora_search_options o = ok;
  o.parameter_budget = -1;
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, space, f, o), Catch::Contains("no configuration meets"));
  ta::glora_space costly = space;
  costly.D = {ta::glora_choice::vector()};  // 16 per layer at least
  o.parameter_budget = 47;
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, costly, f, o), Catch::Contains("48"));
  // Options out of range.
  for (int k = 0; k < 9; ++k) {
    o = ok;
    if (k == 0) o.population = 0;
    if (k == 1) o.top_k = 0;
    if (k == 2) o.generations = 0;
    if (k == 3) o.mutations = -1;
    if (k == 4) o.mutation_probability = 1.5;
    if (k == 5) o.crossovers = -2;
    // So large that the counts of draws (10 × mutations, 100 × population) would overflow.
    if (k == 6) o.population = std::numeric_limits<ta::index>::max();
    if (k == 7) o.mutations = std::numeric_limits<ta::index>::max() / 5;
    if (k == 8) o.crossovers = std::numeric_limits<ta::index>::max() / 5;
    INFO("case " << k);
    CHECK_THROWS_AS(ta::evolutionary_search(layers, space, f, o), ta::argument_error);
  }
  CHECK(calls == 0);
  // A NaN fitness.
  auto nan = [](const std::vector<ta::glora_config>&) { return std::numeric_limits<double>::quiet_NaN(); };
  CHECK_THROWS_WITH(ta::evolutionary_search(layers, space, nan, ok), Catch::Contains("NaN"));
  // parameter_count over layers.
  CHECK_THROWS_AS(ta::parameter_count(std::vector<ta::glora_config>(2), layers), ta::argument_error);
  std::vector<ta::glora_config> too_big(3);
  too_big[0].A = ta::glora_choice::lora(8);
  CHECK_THROWS_AS(ta::parameter_count(too_big, layers), ta::argument_error);
}

TEST_CASE("a generation makes `mutations` new mutants, drawing again where one repeats a candidate",
          "[glora_search]") {
  // One small layer and a mutation probability of 0.2: many mutants equal their parent (the only one,
  // with a population and top-k of 1) or an earlier candidate. Up to 10 × mutations draws still give
  // `mutations` new candidates in every generation after the first.
  const std::vector<ta::glora_layer_shape> layers{{16, 16, 4}};
  const ta::glora_space space = ta::make_glora_space(std::vector<ta::index>{4, 2});
  ta::glora_search_options options;
  options.population = 1;
  options.top_k = 1;
  options.mutations = 5;
  options.crossovers = 0;
  options.generations = 4;
  options.seed = 1;
  std::vector<ta::index> evaluated;
  auto fitness = [](const std::vector<ta::glora_config>& c) { return double(ta::parameter_count(c[0], 16, 16)); };
  ta::evolutionary_search(layers, space, fitness, options,
                          [&](const ta::glora_search_progress& p) { evaluated.push_back(p.evaluated); });
  CHECK(evaluated == std::vector<ta::index>{1, 5, 5, 5});
}

TEST_CASE("the default random refill draws 100 × population times", "[glora_search]") {
  // One layer and a budget of 2 parameters: few of the 900 configurations of ranks {4, 8} are within
  // it. 100 × 50 draws find every one of them in the first generation; 10 × 50 would not.
  const std::vector<ta::glora_layer_shape> layers{{24, 16, 8}};
  const ta::glora_space space = ta::make_glora_space(std::vector<ta::index>{4, 8});
  ta::index within = 0;
  for (const auto& a : space.A)
    for (const auto& b : space.B)
      for (const auto& c : space.C)
        for (const auto& d : space.D)
          for (const auto& e : space.E) within += ta::parameter_count(ta::glora_config{a, b, c, d, e}, 24, 16) <= 2;
  REQUIRE(within >= 5);
  ta::glora_search_options options;
  options.parameter_budget = 2;
  options.generations = 1;
  options.seed = 1;
  auto fitness = [](const std::vector<ta::glora_config>&) { return 0.0; };
  CHECK(ta::evolutionary_search(layers, space, fitness, options).evaluations == within);
}
